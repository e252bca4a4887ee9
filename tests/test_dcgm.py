"""DCGM's profiling counters: dcgm-exporter's page (real format, hostile pages, a real local HTTP server) and
nv-hostengine through a fake of DCGM's Python bindings (tests/fakes/dcgm_bindings), and how their values reach
the GPU samples (scripted NVML L4, A100 and H100)."""

from __future__ import annotations

import dataclasses
import importlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.dcgm_exporter_page import (
    SHIPPED_DCP,
    MigInstance,
    Pod,
    a100_gpu,
    exporter_page,
    h100_gpu,
    l4_gpus,
    serving_page,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.telemetry import dcgm, scripted
from tuner.telemetry.dcgm import (
    DcgmGpuValues,
    DcgmProcess,
    DcgmReading,
    DcgmSpec,
    DcgmWatcher,
    ExporterSource,
    HostengineSource,
    apply_dcgm,
    exporter_settings,
    hostengine_endpoint,
    load_bindings,
    parse_dcgm_spec,
    parse_exporter_page,
    stale_after_s,
)
from tuner.telemetry.model import GpuInfo, GpuSample

FAKE_BINDINGS = str(Path(__file__).parent / "fakes" / "dcgm_bindings")
NOW_S = 1_800_000_000.0


def _by_index(page: dcgm.ExporterPage) -> dict[int | None, DcgmGpuValues]:
    return {g.index: g for g in page.gpus if g.gpu_instance_id is None}


# --- dcgm-exporter's page -----------------------------------------------------------------------------------


def test_two_l4s_read_by_uuid_with_every_dcp_field() -> None:
    gpus = l4_gpus(2)
    page = parse_exporter_page(exporter_page(gpus))
    got = _by_index(page)
    assert [g.uuid for g in page.gpus] == [gpus[0].uuid, gpus[1].uuid]
    assert got[0].dram_active == pytest.approx(0.62) and got[1].dram_active == pytest.approx(0.63)
    assert got[1].sm_active == pytest.approx(0.42)
    assert got[0].sm_occupancy == pytest.approx(0.18) and got[0].tensor_active == pytest.approx(0.23)
    assert got[0].pcie_tx_bytes_per_s == 41_943_040 and got[1].pcie_rx_bytes_per_s == 83_886_081
    assert got[0].nvlink_tx_bytes_per_s == 0
    assert got[0].sampled_at_s is None  # dcgm-exporter writes no timestamps
    assert page.fields == {f.attr for f in dcgm.FIELDS}
    assert page.bad_values == 0


def test_the_shipped_counters_csv_has_dram_but_no_sm_active() -> None:
    page = parse_exporter_page(exporter_page(l4_gpus(1), dcp=SHIPPED_DCP))
    (gpu,) = page.gpus
    assert gpu.dram_active == pytest.approx(0.62)
    assert gpu.sm_active is None and gpu.sm_occupancy is None and gpu.nvlink_rx_bytes_per_s is None
    assert "sm_active" not in page.fields


def test_l4_a100_and_h100_on_one_page() -> None:
    gpus = [
        *l4_gpus(2),
        a100_gpu(2, dram_active=0.35),
        h100_gpu(3, dram_active=0.81, nvlink_tx_bytes=9_000_000),
    ]
    got = _by_index(parse_exporter_page(exporter_page(gpus, hostname=None)))
    assert got[2].dram_active == pytest.approx(0.35) and got[2].uuid == gpus[2].uuid
    assert got[3].dram_active == pytest.approx(0.81) and got[3].nvlink_tx_bytes_per_s == 9_000_000


def test_label_spellings_of_other_releases() -> None:
    """``-o`` writes ``uuid``; releases before May 2026 write ``Hostname``, later ones ``hostname``."""
    for uuid_label, hostname_label in (("uuid", "Hostname"), ("UUID", "hostname")):
        text = exporter_page(l4_gpus(1), uuid_label=uuid_label, hostname_label=hostname_label)
        assert f'{uuid_label}="GPU-' in text
        (gpu,) = parse_exporter_page(text).gpus
        assert gpu.uuid == l4_gpus(1)[0].uuid and gpu.dram_active == pytest.approx(0.62)


def test_kubernetes_copies_of_a_shared_gpu_count_once() -> None:
    shared = dataclasses.replace(l4_gpus(1)[0], pods=(Pod("vllm-a"), Pod("vllm-b", namespace="team-2")))
    text = exporter_page([shared])
    assert text.count("DCGM_FI_PROF_DRAM_ACTIVE{") == 2 and 'pod="vllm-b"' in text
    (gpu,) = parse_exporter_page(text).gpus
    assert gpu.dram_active == pytest.approx(0.62)  # not summed over the two pods


def test_mig_instances_are_kept_apart_and_say_so() -> None:
    mig = dataclasses.replace(
        a100_gpu(0),
        mig=(
            MigInstance(1, "3g.40gb", {"DCGM_FI_PROF_DRAM_ACTIVE": 0.5, "DCGM_FI_PROF_SM_ACTIVE": 0.7}),
            MigInstance(2, "4g.40gb", {"DCGM_FI_PROF_DRAM_ACTIVE": 0.1}),
        ),
    )
    text = exporter_page([mig, *l4_gpus(2)[1:]])
    assert 'GPU_I_PROFILE="3g.40gb",GPU_I_ID="1"' in text
    page = parse_exporter_page(text)
    instances = [g for g in page.gpus if g.index == 0]
    assert [(g.gpu_instance_id, g.mig_profile, g.dram_active) for g in instances] == [
        (1, "3g.40gb", 0.5),
        (2, "4g.40gb", 0.1),
    ]
    assert all(g.uuid == mig.uuid for g in instances)  # an instance carries its parent GPU's UUID
    reading = DcgmReading(NOW_S, "test", 30.0, page.gpus, "")
    infos = (_info(0, mig.uuid, 2039.0), _info(1, l4_gpus(2)[1].uuid, 300.0))
    out = apply_dcgm((_sample(0), _sample(1)), infos, reading, NOW_S)
    assert out[0].dram_bw_util_pct is None and out[0].profiling_source is None  # instances are not combined
    assert out[1].dram_bw_util_pct == pytest.approx(63.0)
    assert "GPU 0 split by MIG" in dcgm.mig_note(page.gpus)


def test_ratios_a_hair_over_one_are_clipped_and_others_refused() -> None:
    text = "\n".join(
        [
            'DCGM_FI_PROF_DRAM_ACTIVE{gpu="0",UUID="GPU-a"} 1.004000',
            'DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-a"} -0.000100',
            'DCGM_FI_PROF_DRAM_ACTIVE{gpu="1",UUID="GPU-b"} 7',
            'DCGM_FI_PROF_PCIE_TX_BYTES{gpu="1",UUID="GPU-b"} -5',
            'DCGM_FI_PROF_PCIE_RX_BYTES{gpu="1",UUID="GPU-b"} 1e999',
            'DCGM_FI_PROF_SM_OCCUPANCY{gpu="1",UUID="GPU-b"} NaN',
            'DCGM_FI_PROF_NVLINK_TX_BYTES{gpu="1",UUID="GPU-b"} +Inf',
        ]
    )
    page = parse_exporter_page(text)
    got = _by_index(page)
    assert got[0].dram_active == 1.0 and got[0].sm_active == 0.0
    assert 1 not in got  # every value of GPU 1 was refused: no entry at all
    assert page.bad_values == 5


def test_hostile_lines_never_raise_and_stay_bounded() -> None:
    lines = [
        "garbage",
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE{",
        "DCGM_FI_PROF_DRAM_ACTIVE{}",
        "DCGM_FI_PROF_DRAM_ACTIVE{} 0.5",  # no GPU named: left out
        'DCGM_FI_PROF_DRAM_ACTIVE{gpu="99999999",UUID=""} 0.5',  # no usable GPU label
        'DCGM_FI_PROF_DRAM_ACTIVE{gpu="0",UUID="GPU-\\"x\\n\x1b[31m"} 0.5',  # escapes, a terminal escape
        "DCGM_FI_PROF_DRAM_ACTIVE{" + "}" * 200_000 + " 1 2",  # past MAX_LINE_CHARS: skipped unread
        'DCGM_FI_PROF_DRAM_ACTIVE{gpu="0' + '"}' * 2000 + " 0.5",  # braces galore within the line cap
        'DCGM_FI_PROF_DRAM_ACTIVE{gpu="1",UUID="' + "A" * 3000 + '"} 0.25',
    ]
    lines += [f'DCGM_FI_PROF_DRAM_ACTIVE{{gpu="{i % 60000}",UUID="GPU-{i}"}} 0.5' for i in range(5000)]
    started = time.monotonic()
    page = parse_exporter_page("\n".join(lines))
    assert time.monotonic() - started < 2.0
    assert len(page.gpus) == dcgm.MAX_ENTRIES and page.left_out > 0
    escaped = next(g for g in page.gpus if g.uuid and g.uuid.startswith('GPU-"x'))
    assert escaped.uuid is not None and "\x1b" not in escaped.uuid
    long_uuid = next(g for g in page.gpus if g.uuid and g.uuid.startswith("AAAA"))
    assert long_uuid.uuid is not None and len(long_uuid.uuid) <= 97


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet='DCGM_FIPROFRAMCTV{}="gpuUID,0123456789.eE+-naNI \n\\', max_size=400))
def test_any_text_parses_without_raising(text: str) -> None:
    page = parse_exporter_page("DCGM_FI_PROF_DRAM_ACTIVE{" + text)
    for gpu in page.gpus:
        assert gpu.dram_active is None or 0.0 <= gpu.dram_active <= 1.0


# --- --dcgm SPEC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("", DcgmSpec("auto")),
        ("AUTO", DcgmSpec("auto")),
        ("off", DcgmSpec("off")),
        ("http://10.0.0.7:9400", DcgmSpec("exporter", url="http://10.0.0.7:9400/metrics")),
        ("https://node:9400/metrics", DcgmSpec("exporter", url="https://node:9400/metrics")),
        ("hostengine", DcgmSpec("hostengine", address="127.0.0.1:5555")),
        ("hostengine:gpu-node:5556", DcgmSpec("hostengine", address="gpu-node:5556")),
        ("hostengine:[::1]:5555", DcgmSpec("hostengine", address="[::1]:5555")),
        ("hostengine:unix:/tmp/nv-hostengine", DcgmSpec("hostengine", unix_socket="/tmp/nv-hostengine")),
    ],
)
def test_spec_forms(text: str, spec: DcgmSpec) -> None:
    assert parse_dcgm_spec(text) == spec


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("on", "not auto, off, an http(s):// URL"),
        ("hostengine:5555", "needs a host and a port"),
        ("hostengine:node:99999", "needs a host and a port"),
        ("hostengine:::1:5555", "needs a host and a port"),
        ("hostengine:unix:relative.sock", "absolute path"),
        ("http://", "no host"),
    ],
)
def test_bad_specs_say_why_in_words(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"^--dcgm ") as raised:
        parse_dcgm_spec(text)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_spec_never_shows_its_password() -> None:
    with pytest.raises(ValueError) as raised:
        parse_dcgm_spec("http://user:s3cret@/metrics")
    assert "s3cret" not in str(raised.value)


# --- the exporter's settings from its process ---------------------------------------------------------------


def _exporter(*args: str, env: dict[str, str] | None = None) -> DcgmProcess:
    return DcgmProcess(4242, "dcgm-exporter", ("/usr/bin/dcgm-exporter", *args), env)


def test_exporter_flags_and_environment() -> None:
    assert exporter_settings(_exporter(env={})) == ("http://127.0.0.1:9400/metrics", 30.0, " (its default)")
    url, interval_s, note = exporter_settings(_exporter("-f", "/etc/dcgm-exporter/dcp.csv", "-c", "1000"))
    assert (url, interval_s, note) == ("http://127.0.0.1:9400/metrics", 1.0, "")
    env = {"DCGM_EXPORTER_LISTEN": "[::]:9500", "DCGM_EXPORTER_INTERVAL": "5000"}
    assert exporter_settings(_exporter(env=env))[:2] == ("http://127.0.0.1:9500/metrics", 5.0)
    flags_win = exporter_settings(_exporter("--address=10.1.2.3:9401", "--collect-interval=2000", env=env))
    assert flags_win[:2] == ("http://10.1.2.3:9401/metrics", 2.0)
    unreadable = exporter_settings(_exporter("-a", ":9402"))  # another user's process: no environment
    assert unreadable[:2] == ("http://127.0.0.1:9402/metrics", None) and "not readable" in unreadable[2]
    assert exporter_settings(_exporter("-c", "soon", env={}))[1] is None


def test_hostengine_flags() -> None:
    def endpoint(*args: str) -> DcgmSpec:
        return hostengine_endpoint(DcgmProcess(7, "nv-hostengine", ("/usr/bin/nv-hostengine", *args), None))

    assert endpoint("-n", "--service-account", "nvidia-dcgm") == DcgmSpec(
        "hostengine", address="127.0.0.1:5555"
    )
    assert endpoint("-p", "5600", "-b", "ALL") == DcgmSpec("hostengine", address="127.0.0.1:5600")
    assert endpoint("--port=5601", "--bind-interface", "::1") == DcgmSpec("hostengine", address="[::1]:5601")
    assert endpoint("-d", "-n") == DcgmSpec("hostengine", unix_socket="/tmp/nv-hostengine")
    assert endpoint("--domain-socket", "/run/dcgm.sock") == DcgmSpec(
        "hostengine", unix_socket="/run/dcgm.sock"
    )


# --- onto the GPU samples -----------------------------------------------------------------------------------


def _info(index: int, uuid: str, peak: float | None) -> GpuInfo:
    return GpuInfo(
        index, "NVIDIA L4", uuid, 24 * 2**30, peak, "datasheet" if peak else None, gpm_supported=False
    )


def _sample(index: int, **fields: Any) -> GpuSample:
    return GpuSample(index=index, time_s=NOW_S, **fields)


def _values(uuid: str | None, index: int | None = 0, **fields: Any) -> DcgmGpuValues:
    base: dict[str, Any] = {f.attr: None for f in dcgm.FIELDS}
    base.update(dram_active=0.5, sm_active=0.4, sm_occupancy=0.2, tensor_active=0.1)
    base.update(fields)
    sampled_at_s = base.pop("sampled_at_s", None)
    return DcgmGpuValues(uuid=uuid, index=index, sampled_at_s=sampled_at_s, **base)


def _scripted(
    machine: Callable[..., scripted.ScriptedNvml],
) -> tuple[tuple[GpuInfo, ...], tuple[GpuSample, ...]]:
    """The infos and second samples of a scripted machine read 1 s apart (GPM needs two samples), at NOW_S."""
    clock = scripted.ManualClock(NOW_S - 1)
    backend = scripted.scripted_backend(machine(1 if machine is not scripted.l4 else 2, clock=clock))
    info = backend.open()
    try:
        backend.read(clock(), slow=True)
        return info.gpus, backend.read(clock.advance(1.0), slow=True)
    finally:
        backend.close()


def test_l4s_get_dcgm_bandwidth_from_the_page() -> None:
    infos, samples = _scripted(scripted.l4)
    assert all(s.dram_bw_util_pct is None for s in samples)  # no GPM on Ada
    page = parse_exporter_page(exporter_page(l4_gpus(2, pcie_tx_bytes=1234)))
    reading = DcgmReading(NOW_S - 2, "dcgm-exporter at test", 30.0, page.gpus, "")
    out = apply_dcgm(samples, infos, reading, NOW_S)
    assert [s.dram_bw_util_pct for s in out] == [pytest.approx(62.0), pytest.approx(63.0)]
    assert out[0].dram_bw_gbps == pytest.approx(0.62 * 300)  # the L4's datasheet peak
    assert out[1].sm_active_pct == pytest.approx(42.0) and out[1].tensor_active_pct == pytest.approx(23.0)
    # Read 2 s ago from a page that gives no sample times: at most 2 s + one 30 s interval old.
    assert out[0].profiling_source == "dcgm" and out[0].profiling_age_s == pytest.approx(32.0)
    # PCIe: NVML's own figure stays where it has one; DCGM's fills it only where NVML left None.
    expected_tx = samples[0].pcie_tx_bytes_per_s if samples[0].pcie_tx_bytes_per_s is not None else 1234
    assert out[0].pcie_tx_bytes_per_s == expected_tx


def test_a100_by_uuid_not_by_position() -> None:
    infos, samples = _scripted(scripted.a100_80gb)
    wrong = _values("GPU-somebody-else", index=0, dram_active=0.9)
    right = _values(infos[0].uuid, index=5, dram_active=0.3)
    out = apply_dcgm(samples, infos, DcgmReading(NOW_S, "t", None, (wrong, right), ""), NOW_S)
    assert out[0].dram_bw_util_pct == pytest.approx(30.0)
    assert out[0].dram_bw_gbps == pytest.approx(0.3 * 2039)
    alone = apply_dcgm(samples, infos, DcgmReading(NOW_S, "t", None, (wrong,), ""), NOW_S)
    assert alone[0].dram_bw_util_pct is None  # a UUID that names another GPU is not matched by index


def test_index_is_used_only_where_dcgm_names_no_uuid() -> None:
    samples = (_sample(0), _sample(1))
    infos = (_info(0, "GPU-0", 300.0), _info(1, "GPU-1", None))
    reading = DcgmReading(NOW_S, "t", None, (_values(None, index=1, dram_active=0.25),), "")
    out = apply_dcgm(samples, infos, reading, NOW_S)
    assert out[0] is samples[0]
    assert out[1].dram_bw_util_pct == pytest.approx(25.0) and out[1].dram_bw_gbps is None  # peak unknown


def test_gpm_figures_win_and_broken_gpus_stay_broken() -> None:
    infos, samples = _scripted(scripted.h100_sxm)
    assert samples[0].dram_bw_util_pct is not None  # GPM works
    reading = DcgmReading(NOW_S, "t", None, (_values(infos[0].uuid, dram_active=0.01),), "")
    assert apply_dcgm(samples, infos, reading, NOW_S) == samples
    broken = (_sample(0, error="GPU is lost"),)
    assert apply_dcgm(broken, infos, reading, NOW_S) == broken
    assert apply_dcgm(samples, infos, None, NOW_S) == samples


def test_hopper_where_dcgm_holds_the_counters_gets_dcgm_figures() -> None:
    infos, samples = _scripted(scripted.dcgm_beside)
    assert samples[0].dram_bw_util_pct is None and samples[0].gpm_unavailable_reason
    reading = DcgmReading(
        NOW_S, "t", 1.0, (_values(infos[0].uuid, dram_active=0.45, sampled_at_s=NOW_S - 1),), ""
    )
    out = apply_dcgm(samples, infos, reading, NOW_S)
    assert out[0].dram_bw_util_pct == pytest.approx(45.0) and out[0].dram_bw_gbps == pytest.approx(
        0.45 * 3350
    )
    assert out[0].profiling_source == "dcgm" and out[0].profiling_age_s == pytest.approx(1.0)


def test_staleness_three_intervals_at_least_90_s() -> None:
    infos = (_info(0, "GPU-0", 300.0),)

    def shown(age_s: float, interval_s: float | None) -> bool:
        values = _values("GPU-0", sampled_at_s=NOW_S - age_s)
        reading = DcgmReading(NOW_S, "t", interval_s, (values,), "")
        return apply_dcgm((_sample(0),), infos, reading, NOW_S)[0].dram_bw_util_pct is not None

    assert shown(89.0, None) and not shown(91.0, None)
    assert shown(89.0, 1.0) and not shown(91.0, 1.0)  # 3 x 1 s is under the 90 s floor
    assert shown(170.0, 60.0) and not shown(181.0, 60.0)
    assert stale_after_s(DcgmReading(NOW_S, "t", 60.0, (), "")) == 180.0
    # dcgm-exporter gives no sample times: the age is the page's, read at reading.time_s.
    page_values = _values("GPU-0")
    old_page = DcgmReading(NOW_S - 120, "t", 30.0, (page_values,), "")
    assert apply_dcgm((_sample(0),), infos, old_page, NOW_S)[0].dram_bw_util_pct is None


# --- the watcher over a real local HTTP server --------------------------------------------------------------


def _no_processes() -> list[DcgmProcess]:
    return []


def test_watcher_reads_a_given_exporter_url() -> None:
    clock = scripted.ManualClock(NOW_S)
    with serving_page(exporter_page(l4_gpus(2))) as server:
        watcher = DcgmWatcher(server.url, clock=clock, processes=_no_processes)
        reading = watcher.poll_once()
        watcher.stop()
    assert reading is not None and reading.error is None and watcher.latest() is reading
    assert reading.via == f"dcgm-exporter at {server.url}" and reading.time_s == NOW_S
    assert [g.dram_active for g in reading.gpus] == [pytest.approx(0.62), pytest.approx(0.63)]
    assert reading.interval_s is None
    assert reading.status == f"DCGM via dcgm-exporter at {server.url}, sampling interval unknown"


def test_auto_finds_a_dcgm_exporter_by_its_process() -> None:
    clock = scripted.ManualClock(NOW_S)
    with serving_page(exporter_page(l4_gpus(1))) as server:
        proc = _exporter("-a", f"127.0.0.1:{server.port}", env={"DCGM_EXPORTER_INTERVAL": "5000"})
        watcher = DcgmWatcher(clock=clock, processes=lambda: [proc], bindings_path="/nonexistent")
        reading = watcher.poll_once()
        requests = server.requests
        clock.advance(0.5)
        assert watcher.poll_once() is reading  # within its own min period: the page is not asked again
        assert server.requests == requests
        watcher.stop()
    assert reading is not None and reading.interval_s == 5.0
    assert reading.status == f"DCGM via dcgm-exporter at {server.url}, sampled every 5 s"


def test_exporter_without_the_dcp_set_says_so() -> None:
    with serving_page(exporter_page(l4_gpus(1), dcp=())) as server:
        reading = ExporterSource(server.url, interval_s=30.0).read(NOW_S)
    assert reading.gpus == () and reading.error is None
    assert reading.status == (
        f"dcgm-exporter at {server.url} exports no DCGM_FI_PROF_* fields: its counters CSV leaves out the DCP set"
    )


def test_an_unreachable_exporter_is_a_reason() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _exporter("-a", f":{port}", env={})
    watcher = DcgmWatcher(processes=lambda: [proc], bindings_path="/nonexistent", clock=lambda: NOW_S)
    started = time.monotonic()
    reading = watcher.poll_once()
    assert time.monotonic() - started < 3.0
    assert reading is not None and reading.gpus == () and reading.error
    assert reading.status.startswith(f"dcgm-exporter at http://127.0.0.1:{port}/metrics: not reachable")


def test_auto_with_no_dcgm_is_silent_and_looks_again_every_30_s() -> None:
    clock = scripted.ManualClock(NOW_S)
    looks = []

    def processes() -> list[DcgmProcess]:
        looks.append(clock())
        return []

    watcher = DcgmWatcher(clock=clock, processes=processes, bindings_path="/nonexistent")
    assert watcher.poll_once() is None and watcher.latest() is None
    clock.advance(29.0)
    assert watcher.poll_once() is None
    assert len(looks) == 1
    clock.advance(1.0)
    watcher.poll_once()
    assert len(looks) == 2
    assert DcgmWatcher("off", processes=processes).poll_once() is None


def test_the_watcher_thread_reads_and_stops() -> None:
    with serving_page(exporter_page(l4_gpus(1))) as server:
        watcher = DcgmWatcher(server.url, poll_s=0.05, processes=_no_processes)
        watcher.start()
        deadline = time.monotonic() + 5.0
        while watcher.latest() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 1.0
    latest = watcher.latest()
    assert latest is not None and latest.gpus[0].dram_active == pytest.approx(0.62)
    assert not any(t.name == "infertop-dcgm" for t in _threads())


def _threads() -> list[threading.Thread]:
    return threading.enumerate()


# --- nv-hostengine through the fake bindings ----------------------------------------------------------------


@pytest.fixture
def hostengine() -> Iterator[tuple[Any, str]]:
    """The fake bindings' scripted hostengine with two L4s, listening (a real socket) on 127.0.0.1."""
    bindings = load_bindings(FAKE_BINDINGS)
    assert not isinstance(bindings, str), bindings
    fake = importlib.import_module("fake_hostengine")
    state = fake.reset()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    state.listening = {address}
    ts = int((NOW_S - 0.5) * 1e6)
    for gpu in l4_gpus(2):
        values = {
            f.field_id: (0.5 + 0.1 * gpu.index if f.ratio else 1_000_000 * (gpu.index + 1), ts)
            for f in dcgm.FIELDS
        }
        state.gpus.append(fake.FakeGpu(gpu.index, gpu.uuid, values))
    try:
        yield state, address
    finally:
        listener.close()


def _source(address: str, **options: Any) -> HostengineSource:
    bindings = load_bindings(FAKE_BINDINGS)
    assert not isinstance(bindings, str)
    return HostengineSource(bindings, address=address, **options)


def test_hostengine_values_of_fields_dcgm_watches(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.watched = set(dcgm.FIELD_IDS)
    source = _source(address)
    reading = source.read(NOW_S)
    assert reading.error is None and reading.via == f"nv-hostengine at {address}"
    assert [g.uuid for g in reading.gpus] == [g.uuid for g in l4_gpus(2)]
    assert (
        reading.gpus[1].dram_active == pytest.approx(0.6) and reading.gpus[1].pcie_rx_bytes_per_s == 2_000_000
    )
    assert reading.gpus[0].sampled_at_s == pytest.approx(NOW_S - 0.5)
    assert reading.status == f"DCGM via nv-hostengine at {address}, sampling interval not known yet"
    assert state.watches == [] and state.field_groups == {}  # read-only: nothing added
    assert state.connects[0]["timeoutMs"] == 1000 and state.connects[0]["persist"] == 0
    for gpu in state.gpus:  # DCGM samples again 30 s later
        gpu.values = {k: (v, ts + 30_000_000) for k, (v, ts) in gpu.values.items()}
    again = source.read(NOW_S + 30)
    assert again.interval_s == pytest.approx(30.0) and "sampled every 30 s or faster" in again.status
    source.close()
    assert state.open_handles == set()


def test_hostengine_fields_nobody_watches_are_said_and_not_watched(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    watcher = DcgmWatcher(f"hostengine:{address}", bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S)
    reading = watcher.poll_once()
    watcher.stop()
    assert reading is not None and reading.error is None
    assert not any(g.has_values() for g in reading.gpus)
    assert reading.status == f"DCGM at {address} watches no DRAM active (field 1005); --dcgm-watch asks it to"
    assert state.watches == [] and state.field_groups == {} and state.destroyed_groups == []


def test_dcgm_watch_adds_one_watch_every_second(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    fields_module = importlib.import_module("dcgm_structs")
    source = _source(address, watch=True)
    reading = source.read(NOW_S)
    assert len(state.watches) == 1
    watch = state.watches[0]
    assert watch["updateFreq"] == 1_000_000 and watch["groupId"] == fields_module.DCGM_GROUP_ALL_GPUS
    assert watch["fieldIds"] == list(dcgm.FIELD_IDS)
    assert reading.interval_s == 1.0 and reading.gpus[0].dram_active == pytest.approx(0.5)
    assert (
        "every 1 s at infertop's request" in reading.status
        and "every client of these fields" in reading.status
    )
    source.read(NOW_S + 1)
    assert len(state.watches) == 1  # once per connection, not per read
    source.close()
    assert state.watches == [] and len(state.destroyed_groups) == 1 and state.field_groups == {}


def test_dcgm_watch_falls_back_to_the_ratios(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.refuse_watch = {1011}  # no NVLink on an L4: the full set cannot be sampled
    source = _source(address, watch=True)
    reading = source.read(NOW_S)
    assert [w["fieldIds"] for w in state.watches] == [[1002, 1003, 1004, 1005]]
    assert len(state.destroyed_groups) == 1  # the group DCGM refused to watch is not left behind
    assert "watching fields 1002-1005 every 1 s" in reading.status
    source.close()


def test_profiling_not_supported_is_said(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.watched = set(dcgm.FIELD_IDS)
    for gpu in state.gpus:
        gpu.statuses = {f: -36 for f in dcgm.FIELD_IDS}
    reading = _source(address).read(NOW_S)
    assert reading.status == f"DCGM at {address} gives no DRAM active (profiling not supported on this GPU)"


def test_blank_values_are_none(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.watched = set(dcgm.FIELD_IDS)
    state.gpus[0].values[1005] = (dcgm.DCGM_FP64_BLANK, 1)
    state.gpus[0].values[1009] = (dcgm.DCGM_INT64_BLANK + 2, 1)
    reading = _source(address).read(NOW_S)
    assert reading.gpus[0].dram_active is None and reading.gpus[0].pcie_tx_bytes_per_s is None
    assert reading.gpus[0].sm_active == pytest.approx(0.5)


def test_nothing_listening_fails_fast_without_dcgm_connect(hostengine: tuple[Any, str]) -> None:
    state, _ = hostengine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watcher = DcgmWatcher(f"hostengine:127.0.0.1:{port}", bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S)
    started = time.monotonic()
    reading = watcher.poll_once()
    assert time.monotonic() - started < 1.0
    assert reading is not None and reading.error and "nothing answers there" in reading.error
    assert reading.status.startswith(f"DCGM at 127.0.0.1:{port}: nothing answers there")
    assert state.connects == []


def test_a_lost_connection_is_a_reason_then_reconnects(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.watched = set(dcgm.FIELD_IDS)
    state.drop_connection_after = 1
    source = _source(address, reconnect_s=10.0)
    assert source.read(NOW_S).error is None
    lost = source.read(NOW_S + 1)
    assert lost.error and "not valid any longer" in lost.error and not source.connected
    assert source.read(NOW_S + 2).error  # not tried again before 10 s
    assert len(state.connects) == 1
    state.drop_connection_after = None
    assert source.read(NOW_S + 12).error is None and len(state.connects) == 2
    source.close()


def test_the_library_missing_is_a_reason(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.library_present = False
    structs = importlib.import_module("dcgm_structs")
    structs.dcgmLib = None
    try:
        reading = _source(address).read(NOW_S)
    finally:
        state.library_present = True
    assert reading.error and "libdcgm" in reading.error


def test_unix_socket_hostengine(hostengine: tuple[Any, str], tmp_path: Path) -> None:
    state, _ = hostengine
    path = str(tmp_path / "nv-hostengine")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        state.listening = {f"unix:{path}"}
        state.watched = {1005}
        watcher = DcgmWatcher(f"hostengine:unix:{path}", bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S)
        reading = watcher.poll_once()
        watcher.stop()
    assert reading is not None and reading.via == f"nv-hostengine at unix:{path}"
    assert reading.gpus[0].dram_active == pytest.approx(0.5) and reading.gpus[0].sm_active is None


def test_auto_prefers_a_hostengine_with_values(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    state.watched = set(dcgm.FIELD_IDS)
    port = address.rsplit(":", 1)[1]
    engine = DcgmProcess(1, "nv-hostengine", ("nv-hostengine", "-p", port), None)
    watcher = DcgmWatcher(processes=lambda: [engine], bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S)
    reading = watcher.poll_once()
    watcher.stop()
    assert reading is not None and reading.via == f"nv-hostengine at {address}"
    assert state.open_handles == set()  # stop() disconnected


def test_auto_takes_the_exporter_when_the_hostengine_watches_nothing(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    port = address.rsplit(":", 1)[1]
    with serving_page(exporter_page(l4_gpus(2))) as server:
        engine = DcgmProcess(1, "nv-hostengine", ("nv-hostengine", "-p", port), None)
        exporter = _exporter("-a", f":{server.port}", env={})
        watcher = DcgmWatcher(
            processes=lambda: [engine, exporter], bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S
        )
        reading = watcher.poll_once()
        watcher.stop()
    assert reading is not None and reading.via == f"dcgm-exporter at {server.url}"
    assert reading.interval_s == 30.0 and reading.gpus[0].dram_active == pytest.approx(0.62)
    assert state.open_handles == set() and state.watches == []  # the hostengine was let go, untouched


def test_a_hostengine_without_bindings_is_explained(tmp_path: Path) -> None:
    engine = DcgmProcess(1, "nv-hostengine", ("/usr/bin/nv-hostengine", "-n"), None)
    watcher = DcgmWatcher(processes=lambda: [engine], bindings_path=str(tmp_path), clock=lambda: NOW_S)
    reading = watcher.poll_once()
    assert reading is not None and reading.gpus == () and reading.error
    assert reading.status == (
        f"nv-hostengine runs here, but DCGM's Python bindings are not installed (no dcgm_agent.py in {tmp_path})"
    )


def test_missing_bindings_for_an_explicit_hostengine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dcgm.BINDINGS_ENV, raising=False)
    reason = load_bindings(str(tmp_path))
    assert reason == f"DCGM's Python bindings are not installed (no dcgm_agent.py in {tmp_path})"
    monkeypatch.setenv(dcgm.BINDINGS_ENV, str(tmp_path / "elsewhere"))
    watcher = DcgmWatcher("hostengine", clock=lambda: NOW_S)
    reading = watcher.poll_once()
    assert reading is not None and reading.error and str(tmp_path / "elsewhere") in reading.error
    assert reading.status.startswith(
        "nv-hostengine at 127.0.0.1:5555: DCGM's Python bindings are not installed"
    )


def test_broken_bindings_are_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "dcgmvalue",
        "dcgm_structs",
        "dcgm_fields",
        "dcgm_agent",
        "pydcgm",
        "DcgmHandle",
        "fake_hostengine",
    ):
        if name in sys.modules:
            monkeypatch.delitem(sys.modules, name)
    (tmp_path / "dcgm_agent.py").write_text("import dcgm_structs\n")
    (tmp_path / "dcgmvalue.py").write_text("def broken(:\n")
    reason = load_bindings(str(tmp_path))
    assert isinstance(reason, str) and reason.startswith(f"DCGM's Python bindings in {tmp_path} do not load")
    assert "SyntaxError" in reason and "\n" not in reason
    assert str(tmp_path) not in sys.path and "dcgmvalue" not in sys.modules


def test_bindings_are_not_imported_with_infertop() -> None:
    code = "import sys, tuner.telemetry.dcgm; print(any(m in sys.modules for m in ('dcgm_agent', 'pydcgm')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "False"


def test_auto_keeps_a_hostengine_that_watches_nothing_to_say_so(hostengine: tuple[Any, str]) -> None:
    state, address = hostengine
    port = address.rsplit(":", 1)[1]
    engine = DcgmProcess(1, "nv-hostengine", ("nv-hostengine", "--port", port), None)
    watcher = DcgmWatcher(processes=lambda: [engine], bindings_path=FAKE_BINDINGS, clock=lambda: NOW_S)
    reading = watcher.poll_once()
    watcher.stop()
    assert reading is not None and reading.error is None
    assert reading.status == f"DCGM at {address} watches no DRAM active (field 1005); --dcgm-watch asks it to"
    assert state.watches == []
