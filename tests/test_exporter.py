"""The exporter: its families over the scripted NVML, its command line, and a real Prometheus scraping it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import scripted_exporter
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter, dashboard_json, parse_listen
from tuner.telemetry.httpmessage import is_loopback
from tuner.telemetry.model import EngineSample, Snapshot
from tuner.telemetry.ports import DEFAULT_PORT

REPO = Path(__file__).resolve().parents[1]
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def h100x2() -> Iterator[Exporter]:
    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(2, clock=clock)
    exporter = scripted_exporter(nvml, clock)
    yield exporter
    exporter.stop()


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _one(series: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    hits = [v for k, v in series.items() if all((name, value) in k for name, value in labels.items())]
    assert len(hits) == 1, (labels, series)
    return hits[0]


def test_the_exporter_serves_every_gpu_reading_in_base_units_as_openmetrics(h100x2: Exporter) -> None:
    response = httpx.get(h100x2.url, headers={"Accept": OPENMETRICS}, timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "application/openmetrics-text"
    )
    got = _families(response.text)  # the official OpenMetrics parser: a malformed page raises
    latest = h100x2.sampler.latest
    assert latest is not None
    for s in latest.gpus:
        gpu = str(s.index)
        assert s.dram_bw_util_pct is not None and s.dram_bw_gbps is not None and s.power_w is not None
        assert _one(got["infertop_gpu_dram_bandwidth_ratio"], gpu=gpu) == pytest.approx(
            s.dram_bw_util_pct / 100
        )
        assert _one(got["infertop_gpu_dram_bandwidth_bytes_per_second"], gpu=gpu) == pytest.approx(
            s.dram_bw_gbps * 1e9
        )
        assert _one(got["infertop_gpu_power_watts"], gpu=gpu) == pytest.approx(s.power_w)
        assert _one(got["infertop_gpu_energy_joules_total"], gpu=gpu) == pytest.approx(s.energy_counter_j)
        assert _one(got["infertop_gpu_clock_hertz"], gpu=gpu, clock="sm") == pytest.approx(
            s.sm_clock_mhz * 1e6
        )  # type: ignore[operator]
        assert _one(got["infertop_gpu_kernel_duty_cycle_ratio"], gpu=gpu) == pytest.approx(
            s.gpu_util_pct / 100
        )  # type: ignore[operator]
        assert _one(got["infertop_gpu_memory_used_bytes"], gpu=gpu) == s.vram_used_bytes
        # Every reason NVML names is a series, 0 while it does not hold.
        reasons = {
            dict(k)["reason"]: v
            for k, v in got["infertop_gpu_clock_event_active"].items()
            if ("gpu", gpu) in k
        }
        assert len(reasons) >= 11 and set(reasons.values()) <= {0.0, 1.0}
        assert {r for r, v in reasons.items() if v} == set(s.clock_event_reasons or ())
        for p in s.processes or ():
            assert (
                _one(got["infertop_gpu_process_memory_used_bytes"], gpu=gpu, pid=str(p.pid))
                == p.vram_used_bytes
            )
    assert _one(got["infertop_gpu_up"], gpu="1") == 1.0
    assert _one(got["infertop_host_cpu_ratio"], hostname="gpu-node-01") == pytest.approx(0.23)
    assert got["infertop_exporter_info"]  # version, source, driver
    assert "infertop_exporter_process_cpu_seconds_total" in got  # what exporting costs, in its own series


def test_a_gpu_without_gpm_exports_its_duty_cycles_and_no_bandwidth() -> None:
    clock = scripted.ManualClock()
    exporter = scripted_exporter(scripted.l4(1, clock=clock), clock)
    try:
        got = _families(httpx.get(exporter.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    finally:
        exporter.stop()
    assert "infertop_gpu_dram_bandwidth_ratio" not in got  # never a made-up 0
    assert "infertop_gpu_memory_duty_cycle_ratio" in got and "infertop_gpu_kernel_duty_cycle_ratio" in got


def test_a_lost_gpu_and_a_dead_server_are_series_at_0_with_the_reason() -> None:
    clock = scripted.ManualClock()
    exporter = scripted_exporter(
        scripted.gpu_lost_after(4, gpu_index=1, n_gpus=2, clock=clock), clock, ticks=12
    )
    latest = exporter.sampler.latest
    assert latest is not None
    dead = EngineSample(url="http://127.0.0.1:8000", time_s=latest.time_s, error="not reachable")
    exporter.sampler.latest = Snapshot(latest.time_s, latest.host, latest.gpus, (dead,))
    try:
        got = _families(httpx.get(exporter.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    finally:
        exporter.stop()
    assert _one(got["infertop_gpu_up"], gpu="0") == 1.0
    assert _one(got["infertop_gpu_up"], gpu="1") == 0.0
    (why,) = [dict(k)["error"] for k in got["infertop_gpu_error_info"] if ("gpu", "1") in k]
    assert why  # the reason, in an info series: the up series keeps its labels whatever the error says
    assert not any(("gpu", "1") in k for k in got["infertop_gpu_power_watts"])
    assert _one(got["infertop_engine_up"], url="http://127.0.0.1:8000") == 0.0
    assert "not reachable" in dict(next(iter(got["infertop_engine_error_info"])))["error"]


def test_a_stuck_sampler_is_never_served_as_live(h100x2: Exporter) -> None:
    # The sampler thread hangs in an NVML call (a sick GPU): its last reading ages. Past the limit, every GPU
    # is down with the reason, and no value is served as if it were now.
    clock = h100x2.collector._clock
    assert isinstance(clock, scripted.ManualClock)
    fresh = _families(httpx.get(h100x2.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    assert _one(fresh["infertop_gpu_telemetry_up"]) == 1.0
    clock.advance(30)
    got = _families(httpx.get(h100x2.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    assert _one(got["infertop_gpu_telemetry_up"]) == 0.0
    assert "no reading for 30 s" in dict(next(iter(got["infertop_gpu_telemetry_error_info"])))["reason"]
    assert _one(got["infertop_gpu_up"], gpu="0") == 0.0 and _one(got["infertop_gpu_up"], gpu="1") == 0.0
    assert "infertop_gpu_power_watts" not in got and "infertop_gpu_dram_bandwidth_ratio" not in got
    assert json.loads(h100x2.snapshot_json())["age_s"] == pytest.approx(30, abs=0.5)


def test_when_the_driver_goes_away_every_gpu_stays_a_series_at_0() -> None:
    clock = scripted.ManualClock()
    exporter = scripted_exporter(scripted.driver_gone_after(6, n_gpus=2, clock=clock), clock, ticks=12)
    try:
        got = _families(httpx.get(exporter.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    finally:
        exporter.stop()
    assert _one(got["infertop_gpu_telemetry_up"]) == 0.0
    assert _one(got["infertop_gpu_up"], gpu="0") == 0.0 and _one(got["infertop_gpu_up"], gpu="1") == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400)),
        (":9500", ("127.0.0.1", 9500)),
        ("0.0.0.0:9400", ("0.0.0.0", 9400)),
        ("[::1]:9401", ("::1", 9401)),
        ("10.0.0.5", ("10.0.0.5", DEFAULT_PORT)),
        ("9401", ("127.0.0.1", 9401)),  # a port alone: this machine only, like the default
        ("[::ffff:127.0.0.1]:9401", ("::ffff:127.0.0.1", 9401)),
        ("::ffff:127.0.0.1", ("::ffff:127.0.0.1", DEFAULT_PORT)),  # no port: cannot be read as ADDRESS:PORT
        ("::1", ("::1", DEFAULT_PORT)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
        ("::ffff:127.0.0.1", True), ("[::ffff:127.0.0.2]", True),
        ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("::ffff:10.0.0.5", False),
        ("gpu-node-01", False), ("127.0.0.1.example.org", False),
    ],
)  # fmt: skip
def test_which_addresses_are_this_machine_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("text", ["host:port", "1.2.3.4:99999", "::1:9400", "[::1"])
def test_bad_listen_addresses_are_refused_in_words(text: str) -> None:
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(text)


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_the_exporter_command_refuses_bad_input_in_one_line() -> None:
    bad = _run("exporter", "--listen", "host:port")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "port" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _run("exporter", "--simulate", "h100x1", "--listen", f"127.0.0.1:{port}")
    assert busy.returncode == 1 and "cannot listen on" in busy.stderr and "Traceback" not in busy.stderr


# --- a real Prometheus --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus server is not installed (scripts/test.sh installs Debian's package)")
        pytest.skip("the prometheus server is not installed (apt install prometheus)")
    return found


def _query(base: str, promql: str) -> list[dict[str, object]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]  # type: ignore[no-any-return]


def _serving(
    exporter: Exporter, clock: scripted.ManualClock, server_pid: int, ticks: int = 80
) -> tuple[Snapshot, Snapshot]:
    """Feed ``ticks`` readings of a server on ``server_pid`` generating 500 tokens/s, with latency figures;
    the first and the last reading fed."""
    fed: list[Snapshot] = []
    for tick in range(ticks):
        clock.advance(0.25)
        read = exporter.sampler.tick()
        assert read is not None
        engine = EngineSample(
            url="http://127.0.0.1:8000", time_s=read.time_s, engine="vllm", model_name="llama",
            requests_running=12.0, requests_waiting=0.0, kv_cache_usage_pct=41.0,
            generation_tokens_total=500.0 * tick * 0.25, server_pids=(server_pid,),
            ttft_p50_s=0.08, ttft_p95_s=0.2, ttft_p99_s=0.3, tpot_p50_s=0.02, tpot_p95_s=0.03, tpot_p99_s=0.04,
        )  # fmt: skip
        snap = Snapshot(read.time_s, read.host, read.gpus, (engine,))
        exporter.collector.take(snap)
        exporter.sampler.latest = snap
        fed.append(snap)
    return fed[0], fed[-1]


@pytest.fixture
def serving() -> Iterator[Exporter]:
    clock = scripted.ManualClock()
    pid = scripted.INVISIBLE_PID + 1
    nvml = scripted.h100_sxm(2, clock=clock, processes=[scripted.FakeProcess(pid, 1, 40 * 2**30)])
    exporter = scripted_exporter(nvml, clock, ticks=1)
    _serving(exporter, clock, pid)
    yield exporter
    exporter.stop()


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(dashboard_json())
    return [
        (panel["title"], target["expr"].replace("$__range", "1m"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


def test_the_grafana_dashboard_asks_only_for_series_the_exporter_serves(serving: Exporter) -> None:
    served = {name.removesuffix("_total") for name in _families(
        httpx.get(serving.url, headers={"Accept": OPENMETRICS}, timeout=5).text
    )}  # fmt: skip
    queries = _dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        for name in re.findall(r"infertop_[a-z_]+", expr):
            assert name.removesuffix("_total") in served, (title, name)


def test_a_real_prometheus_scrapes_the_exporter_and_stores_what_nvml_said(
    serving: Exporter, prometheus_bin: str, tmp_path: Path
) -> None:
    h100x2 = serving
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: infertop\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{h100x2.port}']\n"
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        power: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            try:
                if len(power := _query(base, "infertop_gpu_power_watts")) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert len(power) == 2, "Prometheus stored no power series within 60 s"
        up = _query(base, 'up{job="infertop"}')
        assert up and up[0]["value"][1] == "1"  # type: ignore[index]
        latest = h100x2.sampler.latest
        assert latest is not None
        by_gpu = {s.index: s for s in latest.gpus}
        for series in power:
            labels = series["metric"]
            gpu = by_gpu[int(labels["gpu"])]  # type: ignore[index]
            assert labels["uuid"] and float(series["value"][1]) == pytest.approx(gpu.power_w)  # type: ignore[index]
        bw = _query(base, "sum(infertop_gpu_dram_bandwidth_bytes_per_second)")
        expected = sum(s.dram_bw_gbps or 0 for s in latest.gpus) * 1e9
        assert float(bw[0]["value"][1]) == pytest.approx(expected)  # type: ignore[index]
        assert _query(base, 'infertop_gpu_clock_event_active{reason="hw_thermal_slowdown"}')
        # Every panel of the shipped Grafana dashboard is valid PromQL and finds its series (rate() needs two
        # scrapes: asked until it answers).
        for title, expr in _dashboard_queries():
            query = expr.replace("$instance", ".*").replace("$gpu", ".*")
            while not (answer := _query(base, query)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert answer, f"the dashboard's panel {title!r} found nothing: {query}"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=20)


def test_an_inference_server_exports_its_energy_per_token_labelled_with_its_gpus() -> None:
    # A server whose process holds GPU 1 of 2, generating 500 tokens/s for 20 s of readings.
    clock = scripted.ManualClock()
    server_pid = scripted.INVISIBLE_PID + 1
    nvml = scripted.h100_sxm(2, clock=clock, processes=[scripted.FakeProcess(server_pid, 1, 40 * 2**30)])
    exporter = scripted_exporter(nvml, clock, ticks=1)
    url = "http://127.0.0.1:8000"
    try:
        first, snap = _serving(exporter, clock, server_pid)
        got = _families(httpx.get(exporter.url, headers={"Accept": OPENMETRICS}, timeout=5).text)
    finally:
        exporter.stop()
    j_per_token = _one(got["infertop_engine_energy_joules_per_token"], url=url)
    assert dict(next(iter(got["infertop_engine_info"])))["gpus"] == "1"  # the server's GPU, not both
    # By hand: GPU 1's energy counter over the window, over the tokens generated meanwhile.
    e0, e1 = first.gpus[1].energy_counter_j, snap.gpus[1].energy_counter_j
    assert e0 is not None and e1 is not None
    by_hand = (e1 - e0) / (snap.time_s - first.time_s) / 500.0
    assert j_per_token == pytest.approx(by_hand, rel=0.1)
    assert _one(got["infertop_engine_tokens_per_second_per_watt"], url=url) == pytest.approx(1 / j_per_token)
    assert _one(got["infertop_engine_up"], url=url, engine="vllm") == 1.0


def test_the_shipped_alerts_fire_on_the_series_they_name() -> None:
    # promtool's own unit tests of the rules (tests/data/infertop-alerts-test.yml): a GPU down 2 minutes, NVML
    # down, a server down, 30 % of 10 minutes in HW thermal slowdown, a queue rising for 10 minutes; and not
    # before their time.
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail(
                "promtool is not installed (Debian's prometheus package has it; scripts/test.sh installs it)"
            )
        pytest.skip("promtool is not installed (apt install prometheus)")
    rules = REPO / "tuner" / "telemetry" / "prometheus" / "infertop-alerts.yml"
    assert rules.read_text() == _run("exporter", "--prometheus-alerts").stdout  # what the command prints
    check = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", str(REPO / "tests" / "data" / "infertop-alerts-test.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
