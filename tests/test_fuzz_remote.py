"""Property-based fuzzing of what other machines send: exporters' /snapshot.json into the remote reader and on
into the fleet's widgets, inference servers' /metrics into the engine scrapers and their panels.

Whatever arrives, no exception escapes, and what gets through is what the widgets were written for: finite
numbers within their unit's range, short printable text. The budget is the "ci" profile of tests/conftest.py
(``HYPOTHESIS_PROFILE=deep`` runs many more examples on a developer's machine).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from typing import Any

from hostile_peers import snapshot_document
from hypothesis import event, given
from hypothesis import strategies as st
from textual.geometry import Size

from tui.widgets.engine_line import EngineLine
from tui.widgets.engine_panel import EnginePanel
from tui.widgets.fleet import HostRow
from tui.widgets.gpu_card import CARD_SERIES, GpuCard
from tui.widgets.host_bar import HostBar
from tuner.telemetry.energy import SnapshotWindow
from tuner.telemetry.engines import ENGINES, EngineScraper
from tuner.telemetry.fetch import PageError
from tuner.telemetry.foreign import MAX_TEXT, value_range
from tuner.telemetry.model import EngineSample, to_jsonable
from tuner.telemetry.remote import RemoteHost, decode_json, parse_snapshot_page, summarise_host
from tuner.telemetry.sampler import History

# --- what a hostile peer sends ------------------------------------------------------------------------------

HOSTILE_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([1e999, -1e999, 0, -1, 2**53, 2**64, 1e308, 5e-324, 100.0, 101.0]),
)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "NVIDIA ", "NVIDIA", "[/]", "[bold", "\x1b[2J\x1b]0;owned\x07", "\n\r\t", "\u202e"]
    ),
    st.integers(min_value=MAX_TEXT - 2, max_value=50_000).map(lambda n: "é" * n),
)
HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    HOSTILE_NUMBERS,
    HOSTILE_TEXT,
    st.lists(st.one_of(HOSTILE_NUMBERS, HOSTILE_TEXT, st.none()), max_size=4),
    st.dictionaries(st.text(max_size=8), st.one_of(HOSTILE_NUMBERS, st.none()), max_size=3),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), HOSTILE_NUMBERS, st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=25,
)


def _document() -> dict[str, Any]:
    """A real exporter's page with every kind of record in it: GPUs, their processes, an inference server."""
    doc = snapshot_document(2)
    snap = doc["snapshot"]
    snap["gpus"][0]["processes"] = [
        {"pid": 4242, "gpu_index": 0, "vram_used_bytes": 40 * 2**30, "kind": "compute", "name": "vllm"}
    ]
    engine = EngineSample(
        url="http://127.0.0.1:8000", time_s=snap["time_s"], engine="vllm", model_name="llama",
        requests_running=3.0, kv_cache_usage_pct=41.0, generation_tokens_total=1e5, generation_tokens_per_s=900.0,
        ttft_p50_s=0.1, ttft_p95_s=0.2, ttft_p99_s=0.3, server_pids=(4242,), latency_window_s=60.0,
    )  # fmt: skip
    snap["engines"] = [to_jsonable(engine)]
    return doc


DOCUMENT = _document()


def _records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every JSON object of the page that a field could be spoiled in."""
    snap, info = doc["snapshot"], doc["info"]
    return [
        doc,
        info,
        *info["gpus"],
        snap,
        snap["host"],
        *snap["gpus"],
        *snap["engines"],
        *snap["gpus"][0]["processes"],
    ]


@st.composite
def spoiled_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The real page with a few of its fields (or made-up ones) set to hostile values, or taken away."""
    doc = copy.deepcopy(DOCUMENT)
    records = _records(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        record = draw(st.sampled_from(records))
        key = draw(st.one_of(st.sampled_from(sorted(record)), st.text(max_size=6)))
        if draw(st.booleans()) and key in record:
            del record[key]
        else:
            record[key] = draw(HOSTILE_VALUES)
    return doc


def _shape_of_a_page(inner: Any) -> Any:
    """Arbitrary JSON where the page's parts go: past the format check into the field-by-field reading."""
    return {"format": 1, "info": inner, "snapshot": inner, "age_s": inner}


# --- what reaches the widgets -------------------------------------------------------------------------------


def _fields(obj: Any) -> list[tuple[str, Any]]:
    """Every (name, value) in a reading, nested records and lists included."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item):
                out += _fields(item)
            else:
                out.append((f.name, item))
    return out


def _assert_well_formed(*readings: Any) -> None:
    """Numbers finite and in their unit's range; text short and printable (it may be drawn as it is)."""
    for reading in readings:
        for name, value in _fields(reading):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = value_range(name)
                assert math.isfinite(value) and lo <= value <= hi, (name, value)
            elif isinstance(value, str) and name not in ("state",):
                assert len(value) <= MAX_TEXT + 1 and value.isprintable(), (name, value[:80])


class _Wide:
    """Widgets drawn at a set size without an app (the fuzz draws thousands; an app per example is too slow)."""

    width = 160

    @property
    def size(self) -> Size:
        return Size(self.width, 8)


class WideRow(_Wide, HostRow):
    pass


class WideCard(_Wide, GpuCard):
    pass


class WidePanel(_Wide, EnginePanel):
    pass


class WideLine(_Wide, EngineLine):
    pass


class WideBar(_Wide, HostBar):
    pass


def _draw_host(host: RemoteHost) -> None:
    """What the fleet draws of a host: its line, and opened, its GPUs and inference servers (as HostGroup)."""
    now = time.time()
    for width in (20, 80, 200):
        row = WideRow(host, now)
        row.width = width
        row.expanded = True
        str(row.render())
    if host.snapshot is None or host.info is None:
        return
    snap = host.snapshot
    summarise_host(host.info, snap)
    history, energy = History(maxlen=8), SnapshotWindow()
    for _ in range(2):
        history.add(snap)
        energy.add(snap)
    for info in host.info.gpus:
        card = WideCard(info)  # its title, from the GPU's name, is set here: no markup may be read into it
        card.readings_per_cell = 1
        for sample in snap.gpus:
            series = {n: history.gpu_series(sample.index, n, card.history_needed) for n in CARD_SERIES}
            card.show(sample, series)
            str(card.render())
            card.compact = True
            str(card.render())
            card.compact = False
    panel = WidePanel()
    gen = {e.url: history.engine_series(e.url, "generation_tokens_per_s") for e in snap.engines}
    power = {e.url: energy.power(e.url) for e in snap.engines if e.error is None}
    panel.show(snap.engines, gen, power)
    panel.watch_engines(snap.engines)
    str(panel.render())
    if snap.host is not None:
        bar = WideBar()
        bar.show(snap.host, [snap.host.cpu_pct])
        str(bar.render())


def _read_and_draw(document: Any) -> None:
    """The document as the wire carries it, read as the remote reader reads it, drawn as the fleet draws it."""
    body = json.dumps(document, allow_nan=True).encode()
    try:
        page = parse_snapshot_page(decode_json(body))
    except ValueError:
        event("refused in words")  # the host shows as down with the reason
        return
    event(f"read with {min(page.problems.count, 3)}{'+' if page.problems.count >= 3 else ''} fields n/a")
    _assert_well_formed(page.info, page.snapshot)
    assert page.age_s is None or math.isfinite(page.age_s)
    host = RemoteHost(
        "http://ops:pw@node:9400", page.info, page.snapshot, None, time.time(), (None, 12.0), page.age_s,
        bad_fields=page.problems.count, bad_field_reasons=tuple(page.problems.first),
    )  # fmt: skip
    _draw_host(host)


@given(spoiled_documents())
def test_no_spoiled_snapshot_page_can_break_the_reader_or_the_fleet(document: dict[str, Any]) -> None:
    _read_and_draw(document)


@given(JSON | JSON.map(_shape_of_a_page))
def test_no_json_at_all_can_break_the_reader_or_the_fleet(document: Any) -> None:
    _read_and_draw(document)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_no_bytes_at_all_can_break_the_reader(body: bytes) -> None:
    with contextlib.suppress(ValueError):  # refused in words: all a reader may do
        parse_snapshot_page(decode_json(body))


@given(st.lists(HOSTILE_TEXT, min_size=2, max_size=2))
def test_a_gpu_named_anything_draws(names: list[str]) -> None:
    doc = copy.deepcopy(DOCUMENT)
    for gpu, name in zip(doc["info"]["gpus"], names, strict=True):
        gpu["name"] = name
    page = parse_snapshot_page(doc)
    _draw_host(RemoteHost("http://node:9400", page.info, page.snapshot, None, time.time()))


# --- inference servers' /metrics ----------------------------------------------------------------------------

METRIC_NAMES = sorted(
    {
        name + suffix
        for names in ENGINES.values()
        for field in dataclasses.fields(names)
        if isinstance(getattr(names, field.name), tuple)
        for name in getattr(names, field.name)
        for suffix in (("_bucket", "_bucket", "_sum", "_count") if field.name in ("ttft", "tpot") else ("",))
    }
)
PLAUSIBLE_VALUES = st.floats(min_value=0, max_value=1e6).map(repr)
HOSTILE_SAMPLE_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e999", "1e308", "-0", "0x10", "1_000", "", "\x00", "٣"]),
    st.text(max_size=8),
)
SAMPLE_VALUES = st.one_of(PLAUSIBLE_VALUES, PLAUSIBLE_VALUES, HOSTILE_SAMPLE_VALUES)  # two in three plausible
LABEL_VALUES = st.one_of(
    st.text(max_size=12),
    SAMPLE_VALUES,
    st.integers(min_value=0, max_value=200_000).map(lambda n: "m" * n),
    st.sampled_from(['\\"', "\\", '"', "\x1b[31m", "[/]", "+Inf"]),
)


@st.composite
def metric_lines(draw: st.DrawFn) -> str:
    """A line of an engine's page: mostly one of its own metrics, its labels and value plausible or hostile."""
    made_up = st.from_regex(r"[a-z_:]{1,20}", fullmatch=True)
    name = draw(st.one_of(st.sampled_from(METRIC_NAMES), st.sampled_from(METRIC_NAMES), made_up))
    keys = draw(st.lists(st.sampled_from(["le", "model_name", "name", "engine", "x"]), max_size=3))
    if name.endswith("_bucket"):
        keys = ["le", *keys]
    labels = ",".join(f'{key}="{draw(LABEL_VALUES)}"' for key in keys)
    line = f"{name}{{{labels}}} {draw(SAMPLE_VALUES)}" if keys else f"{name} {draw(SAMPLE_VALUES)}"
    garbage = st.one_of(
        st.text(max_size=30), st.just(f"# TYPE {name} histogram"), st.just(line[: len(line) // 2])
    )
    return draw(st.one_of(st.just(line), st.just(line), st.just(line), garbage))


METRICS_PAGES = st.lists(metric_lines(), min_size=5, max_size=40).map("\n".join)


class _Pages:
    """Stands for the HTTP reader: hands the scraper each page in turn, or a failure."""

    def __init__(self, pages: list[bytes | None]) -> None:
        self._pages = pages

    def get(self, url: str) -> bytes:
        page = self._pages.pop(0)
        if page is None:
            raise PageError("timed out (no complete answer within 0.8 s)")
        return page

    def close(self) -> None:
        pass


@given(
    st.lists(
        st.one_of(METRICS_PAGES.map(str.encode), st.binary(max_size=100), st.none()), min_size=1, max_size=4
    ),
    st.lists(st.floats(min_value=0, max_value=1e4), min_size=4, max_size=4),
    st.one_of(st.none(), st.none(), st.sampled_from(sorted(ENGINES))),  # mostly told by the page
)
def test_no_metrics_page_can_break_the_scraper_or_its_panel(
    pages: list[bytes | None], times: list[float], engine: str | None
) -> None:
    scraper = EngineScraper("http://ops:pw@127.0.0.1:8000", engine=engine, reader=_Pages(list(pages)))  # type: ignore[arg-type]
    samples = tuple(scraper.scrape(t) for t in times[: len(pages)])
    figures = sum(isinstance(v, float) for s in samples for name, v in _fields(s) if name != "time_s")
    event(f"{min(figures, 5)}{'+' if figures >= 5 else ''} figures read")
    for sample in samples:
        _assert_well_formed(sample)
        assert "pw" not in sample.url
    panel, line = WidePanel(), WideLine()
    panel.show(samples, {s.url: [s.generation_tokens_per_s] for s in samples})
    panel.watch_engines(samples)
    str(panel.render())
    for sample in samples:
        line.show(sample, [sample.generation_tokens_per_s])
        str(line.render())


async def test_a_full_card_draws_a_title_of_any_name() -> None:
    # Remote hosts' cards are compact: a full card's border is where a name as markup would break the screen.
    from textual.app import App, ComposeResult

    page = parse_snapshot_page(copy.deepcopy(DOCUMENT))
    names = ["[/", "[/]", "[bold]x", "[@click=app.quit]y[/]", "\\[", "NVIDIA "]
    cards = [GpuCard(dataclasses.replace(page.info.gpus[0], name=name)) for name in names]

    class Cards(App[None]):
        def compose(self) -> ComposeResult:
            yield from cards

    async with Cards().run_test(size=(100, 60)) as pilot:
        for card in cards:
            card.show(page.snapshot.gpus[0], {})
        await pilot.pause()
        pilot.app.export_screenshot()  # every border drawn: run_test raises what drawing raised
    assert all((card.border_title or "").startswith("GPU 0 · ") for card in cards)
