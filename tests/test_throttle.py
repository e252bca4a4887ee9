"""Throttle history: reasons as 0/1 series in the sampler's history, and the share of a window each held."""

from __future__ import annotations

from tuner.telemetry.model import GpuSample, Snapshot
from tuner.telemetry.sampler import History
from tuner.telemetry.throttle import THROTTLE_SERIES, throttle_flags, throttle_shares


def series_of(readings: list[tuple[str, ...] | None]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {name: [] for name in THROTTLE_SERIES}
    for reasons in readings:
        for name, flag in throttle_flags(reasons).items():
            out[name].append(flag)
    return out


def test_shares_are_the_part_of_the_window_each_reason_held_largest_first() -> None:
    readings: list[tuple[str, ...] | None] = (
        [()] * 12 + [("sw_power_cap",)] * 6 + [("sw_power_cap", "hw_thermal_slowdown")] * 2
    )
    assert throttle_shares(series_of(readings)) == [("sw_power_cap", 40.0), ("hw_thermal_slowdown", 10.0)]


def test_benign_reasons_are_not_throttling_and_unknown_bits_count_as_other() -> None:
    readings: list[tuple[str, ...] | None] = [
        ("gpu_idle",),
        ("applications_clocks_setting", "sync_boost"),
        ("other(0x1000)",),
        (),
    ]
    assert throttle_shares(series_of(readings)) == [("other", 25.0)]


def test_readings_without_reasons_are_left_out_and_nothing_known_is_no_share() -> None:
    assert throttle_shares(series_of([None, None, ("sw_thermal_slowdown",), ()])) == [
        ("sw_thermal_slowdown", 50.0)
    ]
    assert throttle_shares(series_of([None, None])) == []
    assert throttle_shares(series_of([(), ()])) == []
    assert throttle_shares({}) == []


def test_shares_of_the_last_readings_only() -> None:
    series = series_of([("hw_slowdown",)] * 4 + [()] * 4)
    assert throttle_shares(series, last=4) == []
    assert throttle_shares(series, last=8) == [("hw_slowdown", 50.0)]
    assert throttle_shares(series, last=0) == []


def test_history_keeps_a_series_per_reason() -> None:
    h = History(maxlen=4)
    for i, reasons in enumerate(
        [None, (), ("sw_power_cap",), ("sw_power_cap", "gpu_idle"), ("board_limit",)]
    ):
        h.add(
            Snapshot(
                time_s=float(i),
                host=None,
                gpus=(GpuSample(index=0, time_s=float(i), clock_event_reasons=reasons),),
            )
        )
    assert h.gpu_series(0, "throttle_sw_power_cap") == [0.0, 1.0, 1.0, 0.0]
    assert h.gpu_series(0, "throttle_board_limit") == [0.0, 0.0, 0.0, 1.0]
    assert h.gpu_series(0, "time_s") == [1.0, 2.0, 3.0, 4.0]
    shares = throttle_shares({name: h.gpu_series(0, name) for name in THROTTLE_SERIES})
    assert shares == [("sw_power_cap", 50.0), ("board_limit", 25.0)]
