"""How long each throttle reason held: one 0/1 series per reason for the history, and their shares of a window.

A reading's clock-event reasons become 1.0 (the reason held) or 0.0 (it did not) in one series per reason, so the
sampler's ring buffers keep them like any other number, and the share of a window a reason held is the mean of
its series over the readings that had reasons at all. Benign reasons (idle, application clocks, sync boost) are
not throttling and get no series.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tuner.telemetry.model import BENIGN_CLOCK_EVENTS
from tuner.telemetry.nvml import CLOCK_EVENT_REASONS

OTHER_REASON = "other"  # a reason bit this version has no name for ("other(0x...)")
THROTTLE_REASONS = (
    *(name for _, name in CLOCK_EVENT_REASONS if name not in BENIGN_CLOCK_EVENTS),
    OTHER_REASON,
)
SERIES_PREFIX = "throttle_"
THROTTLE_SERIES = tuple(SERIES_PREFIX + reason for reason in THROTTLE_REASONS)
"""History series names, one per throttle reason: 1.0 while it held, 0.0 while not, None when unknown."""


@functools.lru_cache(maxsize=256)  # a GPU shows few distinct reason sets; this runs per GPU per sampler tick
def throttle_flags(reasons: tuple[str, ...] | None) -> Mapping[str, float | None]:
    """One reading's reasons as a value per throttle series (all None when the GPU did not report reasons)."""
    if reasons is None:
        return MappingProxyType(dict.fromkeys(THROTTLE_SERIES))
    flags: dict[str, float | None] = dict.fromkeys(THROTTLE_SERIES, 0.0)
    for reason in reasons:
        if reason in BENIGN_CLOCK_EVENTS:
            continue
        name = SERIES_PREFIX + reason
        flags[name if name in flags else SERIES_PREFIX + OTHER_REASON] = 1.0
    return MappingProxyType(flags)  # shared between calls: read-only


def throttle_shares(
    series: Mapping[str, Sequence[float | None]], last: int | None = None
) -> list[tuple[str, float]]:
    """The % of readings (of the ``last`` ones when given) in which each throttle reason held, largest first.

    Readings without reasons (None) are left out of the count; reasons that never held are left out of the
    result, so ``[]`` means the clocks ran free all window (or nothing is known).
    """
    shares = []
    for reason, name in zip(THROTTLE_REASONS, THROTTLE_SERIES, strict=True):
        values = series.get(name, ())
        if last is not None:
            values = values[-last:] if last > 0 else ()
        known = [v for v in values if v is not None]
        held = sum(known)
        if known and held > 0:
            shares.append((reason, 100.0 * held / len(known)))
    shares.sort(key=lambda item: -item[1])
    return shares
