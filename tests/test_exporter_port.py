"""The exporter's default port, and a busy port named with who holds it (issue 20)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tui.exporter_cli import exporter_parser
from tuner.telemetry import ports
from tuner.telemetry.exporter import parse_listen
from tuner.telemetry.ports import DEFAULT_PORT, port_holder
from tuner.telemetry.remote import DEFAULT_EXPORTER_PORT, host_url, read_hosts_file

REPO = Path(__file__).resolve().parents[1]

# Prometheus' registry of exporter ports, https://github.com/prometheus/prometheus/wiki/Default-port-allocations,
# as read on 2026-12-08 from a copy of the page (undated; it holds 10019, granted in June 2024): every port of
# 9100-9999 is given to an exporter, or held back (9200, 9300: Elasticsearch; 9312: Sphinx). Below, the GPU
# exporters that share a node with infertop, the neighbours of the old default, and every grant outside the range.
PROMETHEUS_RANGE = range(9100, 10000)
PROMETHEUS_ALLOCATIONS = {
    9090: "Prometheus server", 9091: "Pushgateway", 9093: "Alertmanager", 9094: "Alertmanager clustering",
    9100: "Node exporter", 9399: "Prometheus SQL Exporter", 9400: "RIPE Atlas Exporter (dcgm-exporter's default)",
    9401: "1-Wire Exporter", 9445: "NVIDIA GPU Exporter", 9454: "NVIDIA SMI Exporter",
    9788: "T-Rex NVIDIA GPU Miner Exporter", 9835: "Nvidia GPU Exporter (utkuozdemir)", 9971: "AMD SMI Exporter",
    9996: "NVML exporter", 9999: "Exporter exporter",
    # Outside the standard range.
    2112: "Tetragon", 2223: "Inspektor Gadget", 3903: "mtail", 4040: "prometheus-nginxlog-exporter",
    5006: "Neptune Fusion Apex Exporter", 5555: "prometheus-jdbc-exporter", 6060: "Crowdsec Exporter",
    7300: "MidoNet agent", 7355: "CS:GO Exporter", 8000: "CXP", 8080: "cAdvisor / Traefik", 8082: "trickster",
    8088: "Fawkes", 8089: "prom2teams", 8292: "Phabricator webhook for Alertmanager", 8404: "HA Proxy (v2+)",
    9001: "freeRouter exporter", 9042: "rds_exporter", 9043: "prometheus-rds-exporter",
    9045: "Prometheus Alertecho", 9087: "Telegram bot for Alertmanager", 9097: "JIRAlert", 9099: "SNMP Trapper",
    **{port: "exporters granted 10001-10024 in turn" for port in range(10001, 10025)},
    10026: "mcexport", 10080: "UNALLOCATED (Amanda; blocked by web browsers)", 10100: "aws_quota_exporter",
    10101: "Prometheus Android Exporter", 10200: "Hardware Observer Operator", 10201: "Hangfire exporter",
    10998: "E3DC Power Management System Exporter", 11111: "Foreman Exporter", 11112: "Threshold Exporter",
    12345: "journald-exporter", 15692: "rabbitmq_prometheus", 15693: "silverpeak-prometheus",
    16995: "Storidge exporter", 17871: "qBittorrent Exporter", 18899: "Solana Wallet Exporter",
    19091: "Transmission Exporter", 19854: "gpbackup Exporter", 19999: "Netdata",
    24231: "Fluent Plugin for Prometheus", 28272: "Nagios Check Exporter", 29091: "Simple Transmission Exporter",
    30042: "Prefect2 Prometheus Exporter", 36123: "Homebridge Prometheus Exporter",
    36333: "Prometheus Weathermen", 39100: "Open Telekom Cloud Prometheus Exporter", 42004: "ProxySQL exporter",
    44322: "Performance Co-Pilot exporter", 44323: "PCP exporter", 61091: "DCOS exporter",
}  # fmt: skip
# What else listens on an inference node by default.
NODE_NEIGHBOURS = {
    3000: "TGI, Grafana", 5555: "nv-hostengine (DCGM)", 6379: "Ray GCS", 8000: "vLLM, Triton, NIM",
    8002: "Triton metrics", 8265: "Ray dashboard", 9400: "dcgm-exporter", 10001: "Ray client server",
    10250: "kubelet", 11434: "Ollama", 29400: "torchrun rendezvous", 29500: "torch.distributed",
    30000: "SGLang",
}  # fmt: skip
RAY_WORKER_PORTS = range(10002, 20000)
KUBERNETES_NODE_PORTS = range(30000, 32768)
LINUX_EPHEMERAL_PORTS = range(32768, 61000)


def test_the_default_port_is_no_one_elses() -> None:
    assert DEFAULT_PORT != 9400  # dcgm-exporter's: the GPU Operator runs it on every GPU node
    assert DEFAULT_PORT not in PROMETHEUS_ALLOCATIONS and DEFAULT_PORT not in PROMETHEUS_RANGE
    assert DEFAULT_PORT not in NODE_NEIGHBOURS
    for taken in (RAY_WORKER_PORTS, KUBERNETES_NODE_PORTS, LINUX_EPHEMERAL_PORTS):
        assert DEFAULT_PORT not in taken


def test_the_exporter_and_the_remote_view_agree_on_it() -> None:
    assert exporter_parser().parse_args([]).listen == f"127.0.0.1:{DEFAULT_PORT}"
    assert parse_listen(exporter_parser().parse_args([]).listen) == ("127.0.0.1", DEFAULT_PORT)
    assert parse_listen("10.0.0.5") == ("10.0.0.5", DEFAULT_PORT)
    assert parse_listen("[::1]") == ("::1", DEFAULT_PORT)
    assert DEFAULT_EXPORTER_PORT == DEFAULT_PORT
    assert host_url("gpu-node-2") == f"http://gpu-node-2:{DEFAULT_PORT}"
    assert host_url("https://node.example/") == f"https://node.example:{DEFAULT_PORT}"
    assert host_url("gpu-node-2:9400") == "http://gpu-node-2:9400"  # a port given is kept


def test_a_hosts_file_line_without_a_port_gets_the_default(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-node-1\n")
    assert read_hosts_file(hosts) == [f"http://gpu-node-1:{DEFAULT_PORT}"]


def test_the_help_names_the_default() -> None:
    assert f"127.0.0.1:{DEFAULT_PORT}" in " ".join(exporter_parser().format_help().split())


# --- a port in use --------------------------------------------------------------------------------------------


def _exporter(port: int, *, host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", "exporter", "--simulate", "h100x1", "--listen", f"{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _refused_in_one_line(run: subprocess.CompletedProcess[str], address: str) -> str:
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    line = run.stderr.strip()
    assert line.startswith(f"infertop exporter: cannot listen on {address}: in use by ")
    assert line.endswith("; choose another port with --listen HOST:PORT")
    return line


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port this process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def _holder_child(code: str, address: str = "127.0.0.1") -> tuple[subprocess.Popen[str], int]:
    """A child that listens on ``address`` (port chosen by the system) after running ``code``; its port."""
    script = textwrap.dedent(
        f"""
        import socket, sys
        {code}
        sock = socket.socket()
        sock.bind(({address!r}, 0))
        sock.listen()
        print(sock.getsockname()[1], flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def _end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)


def test_a_port_this_process_holds_is_named_with_its_pid(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    line = _refused_in_one_line(_exporter(port), f"127.0.0.1:{port}")
    me = psutil.Process()
    assert f"in use by {me.name()} (pid {os.getpid()}, user {me.username()})" in line


def test_a_port_another_process_holds_is_named_with_its_pid_and_name() -> None:
    child, port = _holder_child("")
    try:
        name = psutil.Process(child.pid).name()
        line = _refused_in_one_line(_exporter(port), f"127.0.0.1:{port}")
    finally:
        _end(child)
    assert f"in use by {name} (pid {child.pid}, user " in line


def test_a_listener_on_every_address_holds_the_loopback_port_too() -> None:
    child, port = _holder_child("", address="0.0.0.0")
    try:
        line = _refused_in_one_line(_exporter(port), f"127.0.0.1:{port}")
    finally:
        _end(child)
    assert f"(pid {child.pid}, " in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_NAME) is Linux's")
def test_a_hostile_process_name_stays_on_one_line() -> None:
    rename = "import ctypes; ctypes.CDLL(None).prctl(15, b'evil\\n\\x1b[2Jname', 0, 0, 0)"
    child, port = _holder_child(rename)
    try:
        line = _refused_in_one_line(_exporter(port), f"127.0.0.1:{port}")
    finally:
        _end(child)
    assert f"in use by evil??[2Jname (pid {child.pid}, " in line


def test_another_bind_error_keeps_its_own_words() -> None:
    run = _exporter(DEFAULT_PORT, host="192.0.2.1")  # TEST-NET-1: an address this machine does not have
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert f"cannot listen on 192.0.2.1:{DEFAULT_PORT}: " in run.stderr and "in use" not in run.stderr


# --- port_holder ----------------------------------------------------------------------------------------------


def test_a_free_port_has_no_holder() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert port_holder("127.0.0.1", port) is None


def test_a_listener_elsewhere_does_not_hold_this_address(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert port_holder("127.0.0.2", port) is None  # 127.0.0.1:PORT leaves 127.0.0.2:PORT free
    assert port_holder("0.0.0.0", port) is not None  # every address: 127.0.0.1 among them
    assert port_holder("::ffff:127.0.0.1", port) is not None


def test_where_the_system_table_is_refused_each_process_is_read(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(kind: str = "inet") -> list[object]:
        raise psutil.AccessDenied()  # as on macOS for a user who is not root

    monkeypatch.setattr(psutil, "net_connections", refused)
    holder = port_holder("127.0.0.1", listener.getsockname()[1])
    assert holder is not None and f"(pid {os.getpid()}, " in holder


def test_a_slow_lookup_gives_up_in_time(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(kind: str = "inet") -> list[object]:
        time.sleep(3)
        return []

    monkeypatch.setattr(psutil, "net_connections", slow)
    start = time.monotonic()
    assert port_holder("127.0.0.1", listener.getsockname()[1], timeout_s=0.2) is None
    assert time.monotonic() - start < 1.5


def test_a_failing_lookup_names_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kind: str = "inet") -> list[object]:
        raise RuntimeError("an unforeseen failure")

    monkeypatch.setattr(psutil, "net_connections", broken)
    assert port_holder("127.0.0.1", 1) is None


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs root, to look as another user"
)
def test_a_holder_hidden_from_this_user_is_said_to_be(listener: socket.socket) -> None:
    # The looker drops to nobody once its modules are loaded (the interpreter may live where nobody can read,
    # as under /root): root's sockets stay in /proc/net/tcp, their owner's file descriptors do not.
    look = textwrap.dedent(
        f"""
        import os
        import psutil
        from tuner.telemetry.ports import port_holder
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        print(port_holder("127.0.0.1", {listener.getsockname()[1]}))
        """
    )
    out = subprocess.run([sys.executable, "-c", look], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.stdout.strip() == "another process (not visible to this user)", out.stderr


def test_the_lookup_is_bounded_by_default() -> None:
    assert 0 < ports.LOOKUP_TIMEOUT_S <= 5
