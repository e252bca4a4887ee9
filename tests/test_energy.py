"""Energy per output token from scripted energy and generated-token counters (snapshots built directly)."""

from __future__ import annotations

import pytest

from tuner.telemetry.energy import MIN_TOKENS, SnapshotWindow, counter_rate, engine_power
from tuner.telemetry.model import EngineSample, GpuProcess, GpuSample, Snapshot

URL = "http://127.0.0.1:8000"


def snapshots(
    seconds: int,
    *,
    watts: dict[int, float],
    tokens_per_s: float,
    pids: tuple[int, ...] | None = None,
    holders: dict[int, int] | None = None,
    tokens: list[float] | None = None,
    energy: dict[int, list[float]] | None = None,
) -> list[Snapshot]:
    """One snapshot a second. GPU i's counter rises by watts[i] J a second (or follows energy[i]); the token
    counter by tokens_per_s (or follows ``tokens``); ``holders`` maps pid -> the GPU it holds memory on."""
    out = []
    for t in range(seconds):
        gpus = []
        for index, w in watts.items():
            procs = tuple(
                GpuProcess(pid, index, 2**30, "compute") for pid, g in (holders or {}).items() if g == index
            )
            counter = energy[index][t] if energy and index in energy else 1e6 + w * t
            gpus.append(GpuSample(index=index, time_s=float(t), energy_counter_j=counter, processes=procs))
        generated = tokens[t] if tokens is not None else 5000 + tokens_per_s * t
        engine = EngineSample(url=URL, time_s=float(t), generation_tokens_total=generated, server_pids=pids)
        out.append(Snapshot(time_s=float(t), host=None, gpus=tuple(gpus), engines=(engine,)))
    return out


def test_joules_per_token_on_the_gpu_the_server_uses() -> None:
    snaps = snapshots(
        10, watts={0: 100.0, 1: 300.0}, tokens_per_s=600.0, pids=(42, 43), holders={43: 1, 99: 0}
    )
    power = engine_power(snaps, URL)
    assert power.attributed and power.gpu_indices == (1,)  # pid 43 (a worker of the server) holds GPU 1
    assert power.power_w == pytest.approx(300.0)
    assert power.tokens_per_s == pytest.approx(600.0)
    assert power.joules_per_token == pytest.approx(0.5)
    assert power.tokens_per_s_per_watt == pytest.approx(2.0)
    assert power.window_s == pytest.approx(9.0) and power.unavailable is None


def test_a_server_on_two_of_eight_gpus() -> None:
    watts = {i: 100.0 + 10 * i for i in range(8)}  # GPU 2 draws 120 W, GPU 5 150 W
    snaps = snapshots(10, watts=watts, tokens_per_s=270.0, pids=(7, 8, 9), holders={8: 2, 9: 5, 1234: 3})
    power = engine_power(snaps, URL)
    assert power.gpu_indices == (2, 5) and power.attributed
    assert power.power_w == pytest.approx(270.0)
    assert power.joules_per_token == pytest.approx(1.0)


def test_unknown_server_processes_count_all_gpus_and_say_so() -> None:
    snaps = snapshots(10, watts={0: 100.0, 1: 300.0}, tokens_per_s=400.0, pids=None, holders={43: 1})
    power = engine_power(snaps, URL)
    assert not power.attributed and power.gpu_indices == (0, 1)
    assert power.joules_per_token == pytest.approx(1.0)


def test_pids_that_hold_no_gpu_fall_back_to_all_gpus() -> None:
    snaps = snapshots(10, watts={0: 100.0, 1: 100.0}, tokens_per_s=400.0, pids=(5,), holders={6: 1})
    power = engine_power(snaps, URL)
    assert not power.attributed and power.gpu_indices == (0, 1)


def test_a_server_restart_leaves_out_the_interval_where_its_counter_fell() -> None:
    # 600 tokens a second, the server restarts between t=3 and t=4 (its counter starts again from 100).
    tokens = [1000.0, 1600.0, 2200.0, 2800.0, 100.0, 700.0, 1300.0, 1900.0]
    snaps = snapshots(8, watts={0: 300.0}, tokens_per_s=0.0, tokens=tokens, pids=(1,), holders={1: 0})
    power = engine_power(snaps, URL)
    assert power.tokens_per_s == pytest.approx(600.0)  # 3600 tokens over the 6 s without the restart
    assert power.window_s == pytest.approx(6.0)
    assert power.joules_per_token == pytest.approx(0.5)


def test_a_driver_reload_resets_the_energy_counter() -> None:
    energy = {0: [5000.0 + 200 * t for t in range(4)] + [10.0 + 200 * t for t in range(6)]}
    snaps = snapshots(10, watts={0: 0.0}, tokens_per_s=400.0, energy=energy, pids=(1,), holders={1: 0})
    power = engine_power(snaps, URL)
    assert power.power_w == pytest.approx(200.0)
    assert power.joules_per_token == pytest.approx(0.5)


def test_the_energy_counter_read_every_few_seconds_counts_from_when_it_changed() -> None:
    # Read every 5 s and repeated in between, as the NVML backend does: 250 W.
    energy = {0: [1000.0 + 1250.0 * (t // 5) for t in range(21)]}
    snaps = snapshots(21, watts={0: 0.0}, tokens_per_s=500.0, energy=energy)
    power = engine_power(snaps, URL)
    assert power.power_w == pytest.approx(
        250.0
    )  # readings at 5, 10, 15, 20 s; the first value's time is unknown
    assert power.joules_per_token == pytest.approx(0.5)


def test_only_the_window_counts() -> None:
    # 1000 W for the first 50 s, then 200 W; a 20 s window sees only the second part.
    energy = {0: [1000.0 * min(t, 50) + 200.0 * max(0, t - 50) for t in range(100)]}
    snaps = snapshots(100, watts={0: 0.0}, tokens_per_s=100.0, energy=energy)
    assert engine_power(snaps, URL, window_s=20.0).power_w == pytest.approx(200.0)


def test_too_few_tokens_gives_no_figure_and_says_why() -> None:
    snaps = snapshots(10, watts={0: 300.0}, tokens_per_s=(MIN_TOKENS - 1) / 9)
    power = engine_power(snaps, URL)
    assert power.joules_per_token is None and power.unavailable is not None and "too few" in power.unavailable
    assert power.power_w == pytest.approx(300.0)  # the power is still known


def test_no_energy_counter_gives_no_figure() -> None:
    snaps = [
        Snapshot(
            time_s=float(t),
            host=None,
            gpus=(GpuSample(index=0, time_s=float(t)),),  # energy not supported
            engines=(EngineSample(url=URL, time_s=float(t), generation_tokens_total=1000.0 * t),),
        )
        for t in range(5)
    ]
    power = engine_power(snaps, URL)
    assert power.joules_per_token is None
    assert power.unavailable == "GPU 0 has no energy counter (NVML gives none on this GPU or driver)"
    assert engine_power([], URL).unavailable == "no readings yet"


def test_servers_whose_gpus_are_unknown_are_not_each_charged_the_whole_machine() -> None:
    snaps = snapshots(10, watts={0: 100.0, 1: 300.0}, tokens_per_s=400.0, pids=None)
    other = EngineSample(url="http://127.0.0.1:8001", time_s=0.0, generation_tokens_total=1.0)
    two = [Snapshot(s.time_s, s.host, s.gpus, (*s.engines, other)) for s in snaps]
    power = engine_power(two, URL)
    assert power.joules_per_token is None and "2 servers run here" in (power.unavailable or "")
    # With its GPUs known, each server is charged its own.
    known = snapshots(10, watts={0: 100.0, 1: 300.0}, tokens_per_s=600.0, pids=(43,), holders={43: 1})
    both = [Snapshot(s.time_s, s.host, s.gpus, (*s.engines, other)) for s in known]
    assert engine_power(both, URL).joules_per_token == pytest.approx(0.5)


def test_counter_rate_skips_intervals_that_go_backwards() -> None:
    assert counter_rate([(0.0, 10.0), (1.0, 20.0), (2.0, 5.0), (3.0, 15.0)]) == (20.0, 2.0)
    assert counter_rate([(0.0, 10.0)]) is None


def test_snapshot_window_keeps_a_bounded_span() -> None:
    window = SnapshotWindow(window_s=10.0, margin_s=2.0)
    for snap in snapshots(30, watts={0: 300.0}, tokens_per_s=600.0):
        window.add(snap)
    assert len(window) == 13  # 17 s .. 29 s
    assert window.power(URL).joules_per_token == pytest.approx(0.5)
