"""dcgm-exporter's page: its ``DCGM_FI_PROF_*`` series, parsed, and :class:`ExporterSource`, which reads it.

The GPU Operator runs a dcgm-exporter on every GPU node: ``/metrics`` on ``:9400``, collected every 30 s unless
told otherwise (its flags and environment: :func:`~tuner.telemetry.dcgm.processes.exporter_settings`). Its DCP
series carry ``gpu``, ``UUID`` (``uuid`` with ``-o``), ``pci_bus_id``, ``device``, ``modelName``, then
``GPU_I_PROFILE``/``GPU_I_ID`` on a MIG instance, ``Hostname`` (``hostname`` from May 2026), its label fields
(``DCGM_FI_DRIVER_VERSION``) and, under Kubernetes, ``container``/``namespace``/``pod``
(internal/pkg/rendermetrics/render_metrics.go, internal/pkg/transformation/kubernetes.go). It has no
timestamps; each scrape returns DCGM's latest values (internal/pkg/collector/gpu_collector.go), which DCGM
samples at the collect interval (devicewatchlistmanager: updateFreq = interval x 1000 us).

The page is foreign data: read through :class:`PageReader` (deadline, size cap) and parsed by a line parser
that never raises.

**MIG.** On a GPU split by MIG, dcgm-exporter (in its default flex mode) writes one series per GPU instance,
with its parent's ``gpu`` and ``UUID``, and none for the whole GPU (internal/pkg/devicemonitoring). Those are
kept (``gpu_instance_id`` set), and the status says the GPU gets no figures of its own (:func:`mig_note`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.redact import redact_url
from tuner.telemetry.dcgm.model import (
    FIELDS,
    MAX_ENTRIES,
    DcgmGpuValues,
    DcgmReading,
    checked_value,
    every_words,
    gpu_values,
)
from tuner.telemetry.fetch import PageError, PageReader
from tuner.telemetry.foreign import printable

MAX_LINE_CHARS = 4096  # a real series line is under 600 characters even with Kubernetes labels
_BY_NAME = {name: f for f in FIELDS for name in f.names}


@dataclass(frozen=True)
class ExporterPage:
    """The DCGM profiling series of one dcgm-exporter page."""

    gpus: tuple[DcgmGpuValues, ...]  # whole GPUs and MIG instances, by index then instance
    fields: frozenset[str]  # the DcgmGpuValues attributes the page carries at all
    bad_values: int = 0  # DCP series left out: not a number, not finite, or out of range
    left_out: int = 0  # series past MAX_ENTRIES GPUs and instances


def parse_exporter_page(text: str) -> ExporterPage:
    """The ``DCGM_FI_PROF_*`` series of a dcgm-exporter page. Never raises, whatever the page holds.

    A series is placed by its ``UUID`` (or ``uuid``) and ``gpu`` labels and, on a MIG instance, its
    ``GPU_I_ID``; one without either GPU label is left out. Copies of a series that differ only in other
    labels (Kubernetes writes one per pod sharing the GPU, all with the GPU's value) count once."""
    entries: dict[tuple[str | None, int | None, int | None], dict[str, Any]] = {}
    fields: set[str] = set()
    bad = left_out = 0
    for line in text.splitlines():
        if not line.startswith("DCGM_FI_PROF_") or len(line) > MAX_LINE_CHARS:
            continue
        sample = _split_sample(line)
        if sample is None or sample[0] not in _BY_NAME:
            continue
        name, labels, raw = sample
        field = _BY_NAME[name]
        fields.add(field.attr)
        uuid = _label_text(labels, "UUID") or _label_text(labels, "uuid")
        index, gi = _label_int(labels, "gpu"), _label_int(labels, "GPU_I_ID")
        if uuid is None and index is None:
            continue
        value = checked_value(field, raw)
        if value is None:
            bad += 1
            continue
        key = (uuid, index, gi)
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= MAX_ENTRIES:
                left_out += 1
                continue
            profile = _label_text(labels, "GPU_I_PROFILE") if gi is not None else None
            entry = entries[key] = {
                "uuid": uuid,
                "index": index,
                "gpu_instance_id": gi,
                "mig_profile": profile,
            }
        entry.setdefault(field.attr, value)
    gpus = [gpu_values(entry, sampled_at_s=None) for entry in entries.values()]
    gpus.sort(key=lambda g: (g.index if g.index is not None else 1 << 20, g.gpu_instance_id or -1))
    return ExporterPage(tuple(gpus), frozenset(fields), bad, left_out)


def _split_sample(line: str) -> tuple[str, dict[str, str], str] | None:
    """(name, labels, value text) of one series line; None when it is not one. Linear in the line's length:
    no regular expression that backtracks over a hostile line."""
    brace = line.find("{")
    if brace < 0:
        return None
    close = line.rfind("}")
    rest = line[close + 1 :].split() if close > brace else []
    if not rest:
        return None
    return line[:brace], _labels(line[brace + 1 : close]), rest[0]


def _labels(text: str) -> dict[str, str]:
    """``a="x",b="y"`` as a dict, escapes undone; a label that does not parse ends the list."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find('="', i)
        if eq < 0:
            break
        name = text[i:eq].strip().lstrip(",").strip()
        j, chars = eq + 2, []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
                chars.append({"n": "\n"}.get(text[j], text[j]))
            else:
                chars.append(text[j])
            j += 1
        if j >= n:
            break
        if name and name not in labels:
            labels[name] = "".join(chars)
        i = j + 1
    return labels


def _label_text(labels: Mapping[str, str], name: str, limit: int = 96) -> str | None:
    value = labels.get(name, "").strip()
    return printable(value, limit) if value else None


def _label_int(labels: Mapping[str, str], name: str) -> int | None:
    value = labels.get(name, "").strip()
    return (
        int(value)
        if value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535
        else None
    )


def mig_note(gpus: Sequence[DcgmGpuValues]) -> str:
    """The status's note on GPUs split by MIG (their figures are per instance, none is shown for the whole
    GPU); "" where no GPU is."""
    split = sorted({g.index for g in gpus if g.gpu_instance_id is not None and g.index is not None})
    if not split:
        return ""
    names = ", ".join(str(i) for i in split)
    return f"; GPU {names} split by MIG: DCGM's figures are per instance, not shown for the whole GPU"


class ExporterSource:
    """Reads one dcgm-exporter page; at most every ``min_period_s`` (its values change once per collect
    interval: no need to ask it every second when it collects every 30 s)."""

    def __init__(
        self,
        url: str,
        *,
        interval_s: float | None,
        interval_note: str = "",
        deadline_s: float = 2.0,
        min_period_s: float = 1.0,
    ) -> None:
        self.url = url
        self.via = f"dcgm-exporter at {redact_url(url)}"
        self.interval_s = interval_s
        self._interval_note = interval_note
        self._reader = PageReader(deadline_s=deadline_s)
        self._min_period_s = min_period_s
        self._last: DcgmReading | None = None

    def read(self, now_s: float) -> DcgmReading:
        last = self._last
        if last is not None and last.error is None and 0 <= now_s - last.time_s < self._min_period_s:
            return last
        try:
            body = self._reader.get(self.url)
        except PageError as exc:
            why = printable(str(exc))
            self._last = DcgmReading(now_s, self.via, self.interval_s, (), f"{self.via}: {why}", error=why)
            return self._last
        page = parse_exporter_page(body.decode("utf-8", errors="replace"))
        self._last = DcgmReading(now_s, self.via, self.interval_s, page.gpus, self._status(page))
        return self._last

    def _status(self, page: ExporterPage) -> str:
        if not page.fields:
            return f"{self.via} exports no DCGM_FI_PROF_* fields: its counters CSV leaves out the DCP set"
        if self.interval_s is not None:
            every = f"sampled every {every_words(self.interval_s)}{self._interval_note}"
        else:
            every = f"sampling interval unknown{self._interval_note}"
        missing = "" if "dram_active" in page.fields else "; no DCGM_FI_PROF_DRAM_ACTIVE on it"
        bad = f"; {page.bad_values} values left out (not a ratio or rate)" if page.bad_values else ""
        return f"DCGM via {self.via}, {every}{missing}{bad}{mig_note(page.gpus)}"

    def close(self) -> None:
        self._reader.close()
