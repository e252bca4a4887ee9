"""The GPU card and process table over the scripted NVML: DCGM holding GPM, throttle history, per-process use,
and sparklines on fixed scales."""

from __future__ import annotations

from helpers import prime, scripted_app

from tui.widgets.gpu_card import GpuCard, window_seconds
from tui.widgets.process_table import ProcessTable
from tuner.telemetry import scripted


def text_of(widget: object) -> str:
    return str(widget.render())  # type: ignore[attr-defined]


async def test_dcgm_holding_gpm_is_said_on_the_card_with_the_duty_cycles_instead() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.dcgm_beside(1, clock=clock), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=8)
        await pilot.pause()
        text = text_of(app.monitor.query_one(GpuCard))
        assert "DRAM BW n/a: DCGM holds the profiling counters" in text
        assert "Mem busy" in text and "duty cycle, not BW" in text and "GPU util" in text
        assert "GB/s" not in text  # no bandwidth is made up from the duty cycle


async def test_throttle_line_gives_each_reasons_share_of_the_window() -> None:
    clock = scripted.ManualClock()  # the decode cycle: a 1 s power cap and a 1.5 s thermal slowdown a minute
    app = scripted_app(scripted.h100_sxm(1, clock=clock), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=240)
        await pilot.pause()
        text = text_of(app.monitor.query_one(GpuCard))
        # 60 cells of 4 readings: the whole minute; 6 of 240 readings thermal (2.5 %), 4 power cap (1.7 %).
        assert "(60 s: sw thermal 2%, sw power cap 2%)" in text


async def test_a_steady_gpu_says_no_throttling_in_the_window() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(1, clock=clock, load=scripted.steady_load()), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=40)
        await pilot.pause()
        assert "throttle none (none in 10 s)" in text_of(app.monitor.query_one(GpuCard))


async def test_process_table_shows_sm_and_mem_busy_or_na() -> None:
    clock = scripted.ManualClock()
    procs = [
        scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 30 * 2**30, sm_util_pct=71.0, mem_util_pct=38.0),
        scripted.FakeProcess(scripted.INVISIBLE_PID + 1, 0, 2**30),
    ]
    app = scripted_app(scripted.h100_sxm(1, clock=clock, processes=procs), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=8)
        await pilot.pause()
        table = app.monitor.query_one(ProcessTable)
        labels = [str(c.label).rstrip(" ▼▲") for c in table.columns.values()]
        assert labels[3:6] == ["VRAM", "SM", "MEM BUSY"]
        rows = {str(table.get_row_at(i)[1]): table.get_row_at(i) for i in range(table.row_count)}
        busy, quiet = rows[str(procs[0].pid)], rows[str(procs[1].pid)]
        assert (str(busy[4]), str(busy[5])) == ("71%", "38%")
        assert (str(quiet[4]), str(quiet[5])) == ("n/a", "n/a")


async def test_an_idle_gpu_draws_low_beside_a_busy_one() -> None:
    clock = scripted.ManualClock()

    def load(t: float, gpu_index: int) -> scripted.Load:
        return scripted.steady_load(dram_bw_util_pct=0.0 if gpu_index else 50.0)(t, gpu_index)

    app = scripted_app(scripted.h100_sxm(2, clock=clock, load=load), clock)
    async with app.run_test(size=(100, 40)) as pilot:
        prime(app, clock, ticks=40)
        await pilot.pause()
        busy, idle = (text_of(card).splitlines()[0] for card in app.monitor.query(GpuCard))
        assert busy.rstrip().endswith("▄" * 9)  # 50 %: half a cell
        assert idle.rstrip().endswith("▁" * 9)  # 0 %: the lowest block, not stretched to its own range


def test_window_seconds_covers_first_to_last_reading_plus_one_interval() -> None:
    times: list[float | None] = [100.0 + 0.25 * i for i in range(240)]
    assert window_seconds(times) == 60.0
    assert window_seconds(times, last=4) == 1.0
    assert window_seconds([1.0]) is None
    assert window_seconds([]) is None
