"""Behaviour of the monitor, driven through Pilot: states, keys and what is on screen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_DISCOVERY, prime, scripted_app

from tui.app import make_app
from tui.screens.help import HelpScreen
from tui.widgets.banner import StateBanner
from tui.widgets.gpu_card import GpuCard
from tui.widgets.host_bar import HostBar
from tui.widgets.process_table import ProcessTable
from tuner.telemetry import scripted
from tuner.telemetry.model import GpuState


def text_of(widget: object) -> str:
    return str(widget.render())  # type: ignore[attr-defined]


async def test_real_nvml_on_this_gpu_less_machine_shows_the_state_and_host_then_quits() -> None:
    app = make_app(config=NO_DISCOVERY)  # the real NVML backend, the real host
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        for _ in range(20):  # first host reading arrives from the sampler thread
            await pilot.pause(0.05)
            if app.monitor.query_one(HostBar).sample is not None:
                break
        info = app.sampler.info
        if info.state is GpuState.OK:
            pytest.skip("this machine has a GPU: the no-GPU state cannot be shown")
        banner = app.monitor.query_one(StateBanner)
        assert banner.has_class("shown")
        assert info.message in str(banner.render())
        assert app.monitor.query_one(HostBar).sample is not None
        assert not app.monitor.cards
        await pilot.press("q")
    assert app.return_code == 0 or app.return_code is None


@pytest.mark.parametrize(
    ("nvml", "state", "words"),
    [
        (scripted.no_library(), GpuState.NO_DRIVER, "No NVIDIA driver"),
        (scripted.driver_not_loaded(), GpuState.NO_DRIVER, "driver"),
        (scripted.zero_gpus(), GpuState.NO_GPU, "no GPU"),
        (scripted.no_permission(), GpuState.PERMISSION_DENIED, "ermission"),
        (scripted.driver_mismatch(), GpuState.DRIVER_MISMATCH, "mismatch"),
    ],
)
async def test_startup_states_are_one_clear_banner(
    nvml: scripted.ScriptedNvml, state: GpuState, words: str
) -> None:
    clock = scripted.ManualClock()
    app = scripted_app(nvml, clock)
    async with app.run_test(size=(80, 24)) as pilot:
        prime(app, clock, ticks=2)
        await pilot.pause()
        assert app.sampler.info.state is state
        banner = text_of(app.monitor.query_one(StateBanner))
        assert words.lower() in banner.lower()
        assert "Traceback" not in banner
        assert app.monitor.query_one(HostBar).sample is not None


async def test_h100_card_shows_dram_bandwidth_in_percent_and_gb_s() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(
        scripted.h100_sxm(1, clock=clock, load=scripted.steady_load(dram_bw_util_pct=50.0)), clock
    )
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=8)
        await pilot.pause()
        card = app.monitor.query_one(GpuCard)
        text = text_of(card)
        assert "DRAM BW" in text and "50%" in text
        assert "1,675 GB/s" in text  # 50 % of the H100 SXM's 3,350 GB/s
        assert "mem busy 64% (duty cycle)" in text
        assert "W / 700 W" in text


async def test_l4_has_no_gpm_and_says_so_instead_of_inventing_bandwidth() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.l4(1, clock=clock), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=8)
        await pilot.pause()
        text = text_of(app.monitor.query_one(GpuCard))
        assert "DRAM BW n/a (no GPM, no DCGM)" in text
        assert "GB/s" not in text  # no bandwidth figure is made up from the duty cycle
        assert "Mem busy" in text and "duty cycle, not BW" in text and "GPU util" in text


async def test_eight_gpus_on_80x24_switch_to_compact_rows_and_c_toggles() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(8, clock=clock), clock)
    async with app.run_test(size=(80, 24)) as pilot:
        prime(app, clock, ticks=4)
        await pilot.pause()
        cards = list(app.monitor.query(GpuCard))
        assert len(cards) == 8
        assert all(c.compact for c in cards)
        assert all(c.region.height == 1 for c in cards)
        assert all(c.region.y < 24 for c in cards)  # every GPU visible at once
        await pilot.press("c")
        assert not any(c.compact for c in app.monitor.query(GpuCard))
        await pilot.press("c")
        assert all(c.compact for c in app.monitor.query(GpuCard))


async def test_a_gpu_lost_mid_run_keeps_its_card_with_the_error_and_others_go_on() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.gpu_lost_after(3, gpu_index=1, n_gpus=2, clock=clock), clock)
    async with app.run_test(size=(100, 40)) as pilot:
        prime(app, clock, ticks=6)
        await pilot.pause()
        lost = app.monitor.cards[1]
        fine = app.monitor.cards[0]
        assert "lost" in text_of(lost).lower()
        assert lost.has_class("lost")
        assert "DRAM BW" in text_of(fine)


async def test_driver_gone_mid_run_shows_a_banner_and_host_keeps_updating() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.driver_gone_after(3, clock=clock), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=6)
        await pilot.pause()
        banner = app.monitor.query_one(StateBanner)
        assert banner.has_class("shown") and banner.has_class("error")
        assert "GPU telemetry stopped" in text_of(banner)
        assert app.sampler.latest is not None and app.sampler.latest.host is not None


async def test_keys_pause_help_and_sort() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(2, clock=clock), clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=4)
        await pilot.press("p")
        assert app.sampler.paused
        await pilot.press("space")
        assert not app.sampler.paused
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is app.monitor
        table = app.monitor.query_one(ProcessTable)
        assert table.sort_key == "vram"
        await pilot.press("s")
        assert table.sort_key == "cpu"
        await pilot.press("r")
        assert table.descending is False


async def test_r_records_and_the_recording_replays(tmp_path: Path) -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(1, clock=clock), clock)
    app.record_dir = tmp_path
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=1)
        await pilot.press("R")
        assert app.recorder is not None
        for _ in range(5):
            clock.advance(0.25)
            app.sampler.tick()
        await pilot.press("R")
        assert app.recorder is None
    files = list(tmp_path.glob("infertop-*.ndjson"))
    assert len(files) == 1
    lines = files[0].read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert [json.loads(line)["type"] for line in lines[1:]] == ["snapshot"] * 5

    replay = make_app(config=NO_DISCOVERY, replay=files[0], replay_speed=100.0)
    async with replay.run_test(size=(100, 30)) as pilot:
        await replay.workers.wait_for_complete()
        for _ in range(40):
            await pilot.pause(0.05)
            if replay.sampler.ended:
                break
        await pilot.pause(0.1)
        assert replay.sampler.ended
        assert "GB/s" in text_of(replay.monitor.query_one(GpuCard))


async def test_k_terminates_the_selected_process_only_after_yes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        clock = scripted.ManualClock()
        procs = [scripted.FakeProcess(child.pid, 0, 1024 * 2**20)]
        app = scripted_app(scripted.h100_sxm(1, clock=clock, processes=procs), clock)
        async with app.run_test(size=(100, 30)) as pilot:
            prime(app, clock, ticks=4)
            await pilot.pause()
            table = app.monitor.query_one(ProcessTable)
            table.focus()
            assert table.selected_process is not None and table.selected_process.pid == child.pid
            await pilot.press("k")
            await pilot.press("n")
            await pilot.pause()
            assert child.poll() is None
            await pilot.press("k")
            await pilot.press("y")
            await pilot.pause()
            assert child.wait(timeout=5) is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_the_shipped_demo_recording_replays_with_dram_bandwidth() -> None:
    demo = Path(__file__).resolve().parent.parent / "screenshots" / "demo-h100.ndjson"
    app = make_app(config=NO_DISCOVERY, replay=demo, replay_speed=200.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        for _ in range(100):
            await pilot.pause(0.05)
            if app.sampler.ended:
                break
        await pilot.pause(0.1)
        assert app.sampler.info.label and "SYNTHETIC" in app.sampler.info.label  # never passed off as real
        text = text_of(app.monitor.query_one(GpuCard))
        assert "DRAM BW" in text and "GB/s" in text


async def test_anyones_text_is_never_read_as_markup() -> None:
    """A user name, NVML's message or a recording's words are shown as they are: `[/]` would crash the table,
    and `[@click=app.quit]` would make the banner an action."""
    from tuner.telemetry.model import GpuProcess

    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(), clock)
    async with app.run_test(size=(120, 40)) as pilot:
        prime(app, clock, 2)
        table = app.monitor.query_one(ProcessTable)
        table.set_processes(
            [GpuProcess(pid=4242, gpu_index=0, vram_used_bytes=2**30, kind="compute", user="[/]")]
        )
        hostile = "[@click=app.quit]press me[/] [/]"
        app.monitor.show_banner(hostile, error=True)
        await pilot.pause()
        assert hostile in text_of(app.monitor.query_one(StateBanner))
        assert "[/]" in str(table.get_row_at(0)[2])
        await pilot.press("q")
