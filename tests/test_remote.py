"""Other hosts in the monitor: read from real exporters over HTTP, a stopped one kept as stale, the fleet view."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FixedHost, prime, scripted_app, scripted_exporter
from hostile_peers import (
    Flood,
    TlsFiles,
    locked_server,
    make_tls_files,
    page_server,
    raw_server,
    snapshot_document,
    trickle,
)

from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.fetch import basic_auth
from tuner.telemetry.ports import DEFAULT_PORT
from tuner.telemetry.remote import (
    RemoteAuth,
    RemoteHost,
    RemoteWatcher,
    host_url,
    mean_dram_pct,
    parse_snapshot_page,
    read_hosts_file,
    summarise_host,
)
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig


@pytest.fixture
def three_exporters() -> Iterator[list[Exporter]]:
    clocks = [scripted.ManualClock() for _ in range(3)]  # each host its own clock: its readings are fresh
    exporters = [
        scripted_exporter(scripted.h100_sxm(8, clock=clocks[0]), clocks[0]),
        scripted_exporter(scripted.l4(2, clock=clocks[1]), clocks[1]),
        scripted_exporter(scripted.h100_sxm(1, clock=clocks[2]), clocks[2]),
    ]
    yield exporters
    for e in exporters:
        e.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hosts_read_from_their_exporters_a_stopped_one_stays_as_stale_and_a_dead_one_says_why(
    three_exporters: list[Exporter],
) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    urls = [host_url(f"127.0.0.1:{e.port}") for e in three_exporters] + [dead]
    now = [1000.0]
    watcher = RemoteWatcher(urls, timeout_s=2.0, clock=lambda: now[0])
    watcher.read_all_once()
    hosts = watcher.latest()
    assert [h.state(now[0]) for h in hosts] == ["ok", "ok", "ok", "down"]
    h100s, _, _, down = hosts
    assert h100s.snapshot is not None and h100s.info is not None
    assert len(h100s.snapshot.gpus) == 8 and h100s.name == "gpu-node-01"
    # What came over the wire is what the exporter's sampler read.
    sent = three_exporters[0].sampler.latest
    assert sent is not None and h100s.snapshot.gpus == tuple(
        g.__class__(**{**{f: getattr(g, f) for f in g.__slots__}, "processes": h.processes})  # type: ignore[attr-defined]
        for g, h in zip(sent.gpus, h100s.snapshot.gpus, strict=True)
    )
    assert all(p.command is None for g in h100s.snapshot.gpus for p in g.processes or ())  # no command lines
    assert "not reachable" in (down.error or "")

    three_exporters[1].stop()  # the L4 host stops answering
    now[0] += 30
    watcher.read_all_once()
    h100s, l4s, _, down = watcher.latest()
    assert h100s.state(now[0]) == "ok" and l4s.state(now[0]) == "stale"
    assert l4s.snapshot is not None and len(l4s.snapshot.gpus) == 2  # its last reading, kept
    assert l4s.error and l4s.age_s(now[0]) == pytest.approx(30)
    assert down.state(now[0]) == "down"


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>a web server</html>", "not JSON"),
        (b'{"format": 99}', "format differs"),
        (b'{"format": 1, "info": {}, "snapshot": null}', "no reading yet"),
        (
            b'{"format": 1, "info": {"gpus": []}, "snapshot": {"time_s": 1e999}}',
            "no valid time_s (not finite",
        ),
        (b'{"format": 1, "info": [], "snapshot": {"time_s": 1}}', "no reading yet"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # deeper than the JSON parser's recursion
        (b'{"format": 1, "x": ' + b"9" * 5000 + b"}", "not JSON"),  # an integer past Python's digit limit
    ],
)
def test_whatever_a_host_answers_its_reader_lives_on_and_says_why(body: bytes, why: str) -> None:
    handler = type("Page", (_Page,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        watcher = RemoteWatcher([f"http://127.0.0.1:{server.server_address[1]}"], interval_s=0.05)
        watcher.start()
        time.sleep(0.3)  # several reads
        (host,) = watcher.latest()
        assert host.state(time.time()) == "down" and why in (host.error or ""), host.error
        mine = f"infertop-remote-{watcher.urls[0]}"
        assert any(t.name == mine for t in threading.enumerate())  # still reading
        watcher.stop()
        assert not any(t.name == mine for t in threading.enumerate())
    finally:
        server.shutdown()
        server.server_close()


# --- a hostile or broken peer -------------------------------------------------------------------------------


def _read(url: str, **kwargs: Any) -> RemoteHost:
    """One read of one host, on this thread."""
    watcher = RemoteWatcher([url], **kwargs)
    try:
        watcher.read_all_once()
        return watcher.latest()[0]
    finally:
        watcher.stop()


def _serving(body: bytes) -> contextlib.AbstractContextManager[str]:
    return page_server(lambda request: (200, body))


def _spoiled(field: str, raw: bytes) -> bytes:
    """A real /snapshot.json whose first GPU's ``field`` holds ``raw``, as bytes on the wire."""
    doc = snapshot_document()
    doc["snapshot"]["gpus"][0][field] = "__SPOILED__"
    return json.dumps(doc).encode().replace(b'"__SPOILED__"', raw)


def test_a_vram_of_1e999_is_na_with_its_reason_and_the_host_still_reads() -> None:
    with _serving(_spoiled("vram_used_bytes", b"1e999")) as url:
        host = _read(url)
    assert host.state(time.time()) == "ok" and host.snapshot is not None
    first, second = host.snapshot.gpus
    assert first.vram_used_bytes is None and first.power_w is not None  # that figure, not the GPU
    assert second.vram_used_bytes is not None
    assert host.bad_fields == 1 and host.bad_field_reasons == ("gpus[0].vram_used_bytes: not finite (inf)",)
    assert summarise_host(host.info, host.snapshot).vram_used_bytes == second.vram_used_bytes


@pytest.mark.parametrize(
    ("field", "raw", "why"),
    [
        ("power_w", b'"12"', "not a number"),
        ("gpu_temp_c", b"NaN", "not finite (nan)"),
        ("power_w", b"-Infinity", "not finite (-inf)"),
        ("vram_used_bytes", b"-5", "out of range (-5)"),
        ("power_w", b"1e300", "out of range (1e+300)"),
        ("sm_clock_mhz", b"true", "not a number"),
        ("sm_clock_mhz", b"1.5", "not a whole number"),
        ("pstate", b"1" + b"0" * 400, "out of range"),  # past a float: int() would raise
        ("clock_event_reasons", b'"sw_power_cap"', "not a list"),
        ("processes", b'{"pid": 1}', "not a list"),
        ("gpu_util_pct", b"[]", "not a number"),
    ],
)
def test_one_bad_field_is_na_with_its_reason_and_the_rest_reads(field: str, raw: bytes, why: str) -> None:
    page = parse_snapshot_page(json.loads(_spoiled(field, raw)))
    first = page.snapshot.gpus[0]
    assert getattr(first, field) is None and first.vram_total_bytes is not None
    assert (
        page.problems.first == [f"gpus[0].{field}: {why}"] if why.endswith(")") else page.problems.count == 1
    )
    assert why in page.problems.first[0]


def test_a_record_without_what_it_cannot_exist_without_is_left_out() -> None:
    doc = snapshot_document(3)
    del doc["snapshot"]["gpus"][1]["index"]
    doc["snapshot"]["gpus"][2]["index"] = 0  # a second GPU 0
    doc["snapshot"]["host"] = [1, 2]
    doc["snapshot"]["engines"] = [{"time_s": 1.0}, "x"]
    doc["info"]["gpus"][0]["name"] = 7
    doc["info"]["state"] = "melted"
    page = parse_snapshot_page(doc)
    assert [g.index for g in page.snapshot.gpus] == [0]
    assert page.snapshot.host is None and page.snapshot.engines == ()
    assert page.info.gpus[0].name == "" and page.info.state.value == "error"
    assert "gpus[1]: index missing: left out" in page.problems.first
    assert page.problems.count == 7


def test_foreign_text_is_cut_and_cannot_drive_the_terminal() -> None:
    doc = snapshot_document()
    doc["snapshot"]["host"]["hostname"] = "\x1b[2J\x1b]0;owned\x07" + "n" * 1_000_000
    doc["snapshot"]["gpus"][0]["clock_event_reasons"] = ["x" * 300] * 5000
    page = parse_snapshot_page(doc)
    assert page.snapshot.host is not None
    name = page.snapshot.host.hostname
    assert name.startswith("?[2J?]0;owned?nnn") and len(name) == 257 and name.endswith("…")
    reasons = page.snapshot.gpus[0].clock_event_reasons or ()
    assert len(reasons) == 1024 and len(reasons[0]) == 257
    assert "5000 items, the first 1024 kept" in page.problems.first[0]


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_host_that_trickles_is_down_within_the_deadline(phase: str) -> None:
    # A byte every 50 ms: no per-read timeout ever fires, only a deadline on the whole read ends it.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    serve = trickle(b"", head, 0.05) if phase == "headers" else trickle(head, b" " * 100_000, 0.05)
    with raw_server(serve) as server:
        watcher = RemoteWatcher([server.url], timeout_s=0.5)
        started = time.monotonic()
        reading = threading.Thread(target=watcher.read_all_once, daemon=True)
        reading.start()
        reading.join(5.0)
        took = time.monotonic() - started
    assert not reading.is_alive(), "the read outlived its deadline by seconds"
    (host,) = watcher.latest()
    watcher.stop()
    assert took < 1.5 and host.state(time.time()) == "down"
    assert host.error == "timed out (no complete answer within 0.5 s)"


def test_a_host_that_answered_and_then_trickles_turns_stale() -> None:
    body = json.dumps(snapshot_document()).encode()
    good = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    slow = trickle(b"", b"HTTP/1.1 200 OK\r\n" * 100, 0.05)

    def serve(conn: socket.socket, stopping: threading.Event) -> None:
        (slow if server.connections > 1 else lambda c, s: c.sendall(good))(conn, stopping)

    now = [1000.0]
    with raw_server(serve) as server:
        watcher = RemoteWatcher([server.url], timeout_s=0.5, clock=lambda: now[0])
        watcher.read_all_once()
        assert watcher.latest()[0].state(now[0]) == "ok"
        now[0] += 2
        started = time.monotonic()
        watcher.read_all_once()
        took = time.monotonic() - started
    (host,) = watcher.latest()
    watcher.stop()
    assert took < 1.5 and host.state(now[0]) == "stale" and host.snapshot is not None
    assert host.error is not None and host.error.startswith("timed out")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
def test_a_50_mb_page_is_refused_at_the_cap_without_reading_it_all(declared: bool) -> None:
    flood = Flood(50 * 2**20, declare_length=declared)
    with raw_server(flood) as server:
        host = _read(server.url, timeout_s=10.0)
        assert flood.done.wait(5.0)  # the reader hung up: the server's next send failed
    assert host.state(time.time()) == "down" and "page too large" in (host.error or "")
    assert "8 MiB" in (host.error or "")
    assert flood.sent < 30 * 2**20  # what left the server: the cap and the sockets' buffers, not 50 MB


def test_a_wrong_password_shows_as_unauthorized() -> None:
    with page_server(lambda request: (401, b"who are you")) as url:
        host = _read(url, auth=RemoteAuth(username="ops", password="guess"))
    assert host.state(time.time()) == "down" and (host.error or "").startswith("unauthorized (401)")


def test_credentials_in_a_host_url_are_sent_but_never_shown() -> None:
    sent: list[str | None] = []

    def pages(request: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        sent.append(request.headers.get("Authorization"))
        return 503, b""

    with page_server(pages) as url:
        watcher = RemoteWatcher([host_url(url.replace("http://", "http://ops:s3cret-pw@"))], interval_s=0.05)
        watcher.start()
        try:
            time.sleep(0.2)
            names = [t.name for t in threading.enumerate()]
        finally:
            watcher.stop()
    (host,) = watcher.latest()
    assert sent and sent[0] == basic_auth("ops", "s3cret-pw")
    assert host.error == "HTTP 503 from its exporter" and host.name == "127.0.0.1"
    shown = [host.shown_url, host.name, host.error, *names]
    assert not any("s3cret" in text for text in shown), shown


def test_a_bad_host_with_credentials_is_refused_without_them(capsys: pytest.CaptureFixture[str]) -> None:
    from tui.cli import main

    assert main(["--host", "ftp://ops:s3cret-pw@node"]) == 2
    err = capsys.readouterr().err
    assert "--host" in err and "s3cret" not in err


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    if files is None:
        pytest.skip("no openssl command to make test certificates")
    return files


def test_an_exporter_locked_with_tls_a_client_certificate_and_a_password(tls_files: TlsFiles) -> None:
    auth = RemoteAuth(
        ca_file=tls_files.ca,
        cert_file=tls_files.client_cert,
        key_file=tls_files.client_key,
        username="ops",
        password="s3cret-pw",
    )
    with locked_server(tls_files, json.dumps(snapshot_document()).encode(), "ops", "s3cret-pw") as url:
        assert url.startswith("https://")
        unlocked = _read(url, auth=auth)
        wrong_password = _read(url, auth=dataclasses.replace(auth, password="guess"))
        untrusted = _read(url, auth=dataclasses.replace(auth, ca_file=None))
        no_certificate = _read(
            url, auth=RemoteAuth(ca_file=tls_files.ca, username="ops", password="s3cret-pw")
        )
        plain = _read(url.replace("https://", "http://"), auth=auth)
    now = time.time()
    assert unlocked.state(now) == "ok" and unlocked.snapshot is not None and len(unlocked.snapshot.gpus) == 2
    assert (wrong_password.error or "").startswith("unauthorized (401)")
    assert untrusted.error == "TLS: its certificate is not trusted here (give the CA that signed it)"
    assert no_certificate.state(now) == "down" and no_certificate.error in (
        "TLS: it asks for a client certificate",
        "connection lost mid-answer",  # the server's alert lost to its reset: the race is the kernel's
    )
    assert plain.error == "not an HTTP answer (an https:// server read as http://?)"
    assert "s3cret" not in repr(auth)


def test_unusable_tls_files_are_refused_in_words(tls_files: TlsFiles, tmp_path: Path) -> None:
    def watcher(auth: RemoteAuth) -> RemoteWatcher:
        return RemoteWatcher(["https://node:9400"], auth=auth)

    with pytest.raises(ValueError, match=r"^CA file .*missing.pem: No such file"):
        watcher(RemoteAuth(ca_file=tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"^client certificate .*junk.pem: not usable"):
        watcher(RemoteAuth(cert_file=junk))
    with pytest.raises(ValueError, match=r"not usable .*MISMATCH"):
        watcher(RemoteAuth(cert_file=tls_files.client_cert, key_file=tls_files.server_key))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_encrypted(tls_files.client_key))
    with pytest.raises(ValueError, match="encrypted"):  # and no passphrase prompt on the terminal
        watcher(RemoteAuth(cert_file=tls_files.client_cert, key_file=encrypted))
    with pytest.raises(ValueError, match="a password without a user name"):
        RemoteAuth(password="x")


def _encrypted(key: Path) -> bytes:
    import subprocess

    out = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x"], capture_output=True, check=True
    )
    return out.stdout


def test_a_host_whose_exporter_is_stuck_shows_as_stale(three_exporters: list[Exporter]) -> None:
    # It answers, but with a reading 30 s old by its own clock (its sampler hangs): not "ok".
    stuck = three_exporters[2]
    clock = stuck.collector._clock
    assert isinstance(clock, scripted.ManualClock)
    clock.advance(30)
    watcher = RemoteWatcher([host_url(f"127.0.0.1:{stuck.port}")])
    watcher.read_all_once()
    (host,) = watcher.latest()
    now = time.time()
    assert host.state(now) == "stale" and host.age_s(now) == pytest.approx(30, abs=1)
    watcher.stop()


def test_a_host_that_hangs_never_blocks_the_screen() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        watcher = RemoteWatcher([f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout_s=3.0)
        watcher.start()
        try:
            time.sleep(0.3)  # the reader thread is now waiting on the host
            started = time.perf_counter()
            hosts = watcher.latest()
            assert time.perf_counter() - started < 0.05
            assert hosts[0].state(time.time()) == "waiting"
        finally:
            watcher.stop()


def test_a_host_summary_adds_up_its_gpus(three_exporters: list[Exporter]) -> None:
    snap = three_exporters[0].sampler.latest
    assert snap is not None
    s = summarise_host(three_exporters[0].sampler.info, snap)
    assert s.gpus == 8 and s.gpu_name == "H100 80GB HBM3" and s.lost == 0
    assert s.power_w == pytest.approx(sum(g.power_w or 0 for g in snap.gpus))
    assert s.dram_pct == pytest.approx(sum(g.dram_bw_util_pct or 0 for g in snap.gpus) / 8)
    l4 = three_exporters[1].sampler.latest
    assert l4 is not None
    assert (
        summarise_host(three_exporters[1].sampler.info, l4).dram_pct is None
    )  # no GPM: no made-up bandwidth


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("gpu-node-2", f"http://gpu-node-2:{DEFAULT_PORT}"),
        ("gpu-node-2:9500", "http://gpu-node-2:9500"),
        ("http://10.0.0.7:9400/metrics", "http://10.0.0.7:9400"),
        ("https://node.example/", f"https://node.example:{DEFAULT_PORT}"),
    ],
)
def test_host_urls(text: str, url: str) -> None:
    assert host_url(text) == url


@pytest.mark.parametrize("text", ["", "ftp://node", "http://:9400", "node:port"])
def test_bad_hosts_are_refused_in_words(text: str) -> None:
    with pytest.raises(ValueError, match="--host"):
        host_url(text)


def test_a_hosts_file_skips_comments_and_names_a_bad_line(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# the rack\ngpu-node-1\n\ngpu-node-2:9500  # the new one\n")
    assert read_hosts_file(hosts) == [f"http://gpu-node-1:{DEFAULT_PORT}", "http://gpu-node-2:9500"]
    hosts.write_text("gpu-node-1\nftp://bad\n")
    with pytest.raises(ValueError, match=r"hosts:2: "):
        read_hosts_file(hosts)
    with pytest.raises(ValueError, match="No such file"):
        read_hosts_file(tmp_path / "missing")


# --- the fleet view -----------------------------------------------------------------------------------------


class StaticFleet:
    """Remote hosts in a fixed state (for snapshots): what RemoteWatcher would hold."""

    def __init__(self, hosts: tuple[RemoteHost, ...], now_s: float) -> None:
        self.hosts = hosts
        self.urls = [h.url for h in hosts]
        self.now_s = now_s
        self.interval_s = 2.0

    def clock(self) -> float:
        return self.now_s

    def latest(self) -> tuple[RemoteHost, ...]:
        return self.hosts

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def fleet(n_hosts: int, gpus_per_host: int = 8) -> StaticFleet:
    """``n_hosts`` simulated 8-GPU hosts, read at different moments of their load; host 3 stopped answering
    20 s ago, host 5 never answered."""
    clock = scripted.ManualClock()
    hosts = []
    for i in range(n_hosts):
        url = f"http://gpu-node-{i + 2:02d}:9400"
        if i == 5:
            hosts.append(RemoteHost(url, error="not reachable (connection refused or no route)"))
            continue
        nvml = scripted.h100_sxm(gpus_per_host, clock=clock, processes=[])
        source = LiveSource(
            scripted.scripted_backend(nvml),
            config=SamplerConfig(discover_vllm=False),
            host=_Named(f"gpu-node-{i + 2:02d}"),
            clock=clock,
        )  # type: ignore[arg-type]
        sampler = Sampler(source, history_len=4)
        info = sampler.open()
        history: list[float | None] = []
        for _ in range(4 + 3 * i):
            clock.advance(1.0)
            snap = sampler.tick()
            assert snap is not None
            history.append(mean_dram_pct(snap))
        sampler.stop()
        assert snap is not None
        hosts.append(RemoteHost(url, info, snap, None, None, tuple(history[-30:])))
    now = clock()
    hosts = [
        h
        if h.snapshot is None
        else dataclasses.replace(
            h, error="timed out" if i == 3 else None, last_ok_s=now - (20 if i == 3 else 0.5)
        )
        for i, h in enumerate(hosts)
    ]
    return StaticFleet(tuple(hosts), now)


class _Named(FixedHost):
    def __init__(self, name: str) -> None:
        self.name = name

    def read(self, now_s: float) -> Any:
        return dataclasses.replace(super().read(now_s), hostname=self.name)


@pytest.mark.parametrize(("hosts", "size"), [(32, (80, 24)), (32, (200, 60))])
def test_fleet_snapshot(snap_compare: Any, hosts: int, size: tuple[int, int]) -> None:
    clock = scripted.ManualClock()
    # Processes of another pid namespace: nothing of the machine running the tests shows.
    procs = [scripted.FakeProcess(scripted.INVISIBLE_PID + i, i, (18 + i) * 2**30) for i in range(8)]
    app = scripted_app(scripted.h100_sxm(8, clock=clock, processes=procs), clock)
    app.remote = app.monitor.remote = fleet(hosts)  # type: ignore[assignment]

    async def run_before(pilot: Any) -> None:
        prime(app, clock, ticks=120)
        app.monitor.query_one("#fleet").set_class(True, "shown")
        app.monitor.show_fleet()
        await pilot.pause()
        app.monitor.query("HostRow").first().action_open_host()  # the first host opened onto its GPUs
        app.monitor.show_fleet()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def test_the_fleet_panel_shows_every_host_and_opens_one() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(1, clock=clock), clock)
    app.remote = app.monitor.remote = fleet(6)  # type: ignore[assignment]
    async with app.run_test(size=(120, 40)) as pilot:
        prime(app, clock, ticks=8)
        app.monitor.query_one("#fleet").set_class(True, "shown")
        app.monitor.show_fleet()
        await pilot.pause()
        rows = list(app.monitor.query("HostRow"))
        assert len(rows) == 6
        text = [str(r.render()) for r in rows]
        assert text[0].startswith("▶ gpu-node-02") and "DRAM" in text[0] and "kW" in text[0]
        assert "SIM" in text[0]  # a simulated machine says so
        assert "stale 20s" in text[3]
        assert "down" in text[5] and "not reachable" in text[5]
        rows[0].action_open_host()
        app.monitor.show_fleet()
        await pilot.pause()
        group = rows[0].parent
        assert group is not None and len(group.query("GpuCard")) == 8
        assert all(card.display for card in group.query("GpuCard"))
        assert not any(card.display for card in rows[1].parent.query("GpuCard"))  # type: ignore[union-attr]
        await pilot.pause()


def test_the_monitor_command_refuses_a_bad_host_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tui.cli import main

    assert main(["--host", "ftp://node"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host" in err


def test_the_watcher_reads_hosts_in_parallel(three_exporters: list[Exporter]) -> None:
    # One reader thread per host: a slow host costs its own thread only.
    urls = [host_url(f"127.0.0.1:{e.port}") for e in three_exporters]
    watcher = RemoteWatcher(urls, interval_s=0.2)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(h.state(time.time()) == "ok" for h in watcher.latest()):
            time.sleep(0.05)
        assert all(h.state(time.time()) == "ok" for h in watcher.latest())
        mine = {f"infertop-remote-{u}" for u in urls}
        assert sum(t.name in mine for t in threading.enumerate()) == 3
    finally:
        watcher.stop()


async def test_an_opened_host_shows_its_inference_servers_with_their_energy_per_token() -> None:
    from tui.widgets.engine_panel import EnginePanel
    from tuner.telemetry.model import EngineSample, Snapshot

    remote_clock, local_clock = scripted.ManualClock(), scripted.ManualClock()
    pid = scripted.INVISIBLE_PID + 1  # a vLLM whose process holds GPU 1 of the remote host's 2
    nvml = scripted.h100_sxm(2, clock=remote_clock, processes=[scripted.FakeProcess(pid, 1, 40 * 2**30)])
    exporter = scripted_exporter(nvml, remote_clock, ticks=1)
    watcher = RemoteWatcher([host_url(f"127.0.0.1:{exporter.port}")])
    app = scripted_app(scripted.h100_sxm(1, clock=local_clock), local_clock)
    app.remote = app.monitor.remote = watcher  # type: ignore[assignment]
    try:
        async with app.run_test(size=(120, 50)) as pilot:
            prime(app, local_clock, ticks=4)
            app.monitor.query_one("#fleet").set_class(True, "shown")
            generated = 0.0
            for _ in range(15):  # 15 reads of the host, 2 s of its time apart, 500 tokens/s
                for _ in range(8):
                    remote_clock.advance(0.25)
                    read = exporter.sampler.tick()
                    assert read is not None
                    generated += 500 * 0.25
                    engine = EngineSample(
                        url="http://127.0.0.1:8000", time_s=read.time_s, engine="vllm", model_name="llama",
                        generation_tokens_total=generated, generation_tokens_per_s=500.0, server_pids=(pid,),
                    )  # fmt: skip
                    exporter.sampler.latest = Snapshot(read.time_s, read.host, read.gpus, (engine,))
                watcher.read_all_once()
                app.monitor.show_fleet()
                await pilot.pause()
            row = app.monitor.query("HostRow").first()
            row.action_open_host()
            app.monitor.show_fleet()
            await pilot.pause()
            assert row.parent is not None
            panel = row.parent.query_one(EnginePanel)
            assert panel.display
            text = str(panel.render())
    finally:
        watcher.stop()
        exporter.stop()
    assert "vLLM" in (panel.border_title or "") and "500 tok/s" in text
    assert "J/token" in text and "on GPU 1" in text, text  # the server's GPU, not the host's two


async def test_the_fleet_draws_whatever_its_hosts_sent() -> None:
    from tui.widgets.fleet import HostRow

    # GPUs named nothing useful or in markup, a vram of 1e999, a dead host whose URL holds a password.
    now = time.time()
    hosts = []
    for i, gpu_name in enumerate(["NVIDIA ", "", "[/]", "NVIDIA H100 80GB HBM3"]):
        doc = json.loads(_spoiled("vram_used_bytes", b"1e999" if i == 3 else b"1"))
        for gpu in doc["info"]["gpus"]:
            gpu["name"] = gpu_name
        page = parse_snapshot_page(doc)
        host = RemoteHost(
            f"http://node-{i}:9400", page.info, page.snapshot, None, now, (None, 50.0), page.age_s
        )
        reasons = tuple(page.problems.first)
        hosts.append(dataclasses.replace(host, bad_fields=page.problems.count, bad_field_reasons=reasons))
    hosts.append(RemoteHost("http://ops:s3cret-pw@node-9:9400", error="unauthorized (401)"))
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(1, clock=clock), clock)
    app.remote = app.monitor.remote = StaticFleet(tuple(hosts), now)  # type: ignore[assignment]
    async with app.run_test(size=(160, 60)) as pilot:
        prime(app, clock, ticks=4)
        app.monitor.query_one("#fleet").set_class(True, "shown")
        app.monitor.show_fleet()
        await pilot.pause()
        rows = list(app.monitor.query(HostRow))
        for row in rows:
            row.action_open_host()
        app.monitor.show_fleet()
        await pilot.pause()
        text = [str(r.render()) for r in rows]
        cards = [str(card.render()) for card in app.monitor.query("HostGroup GpuCard")]
    assert all("2×?" in line for line in text[:2]) and "2×[/]" in text[2]
    assert "2×H100" in text[3] and "?1 field n/a: gpus[0].vram_used_bytes: not finite (inf)" in text[3]
    assert "down" in text[4] and "unauthorized (401)" in text[4] and "s3cret" not in text[4]
    assert len(cards) == 8 and all("VRAM" in card for card in cards)


def test_the_monitor_flags_for_locked_hosts(
    tls_files: TlsFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host-ca/--host-cert/--host-key/--host-user and a password from a file or the environment (never a
    flag: ps shows argv to everyone) reach the hosts' reader; what cannot work is one line, exit 2."""
    from tui import cli

    monkeypatch.delenv("INFERTOP_HOST_PASSWORD", raising=False)
    password_file = tmp_path / "pass"
    password_file.write_text("s3cret-pw\n")
    args = cli.monitor_parser().parse_args(
        ["--host", "https://node:9400", "--host-ca", str(tls_files.ca), "--host-cert", str(tls_files.client_cert),
         "--host-key", str(tls_files.client_key), "--host-user", "ops", "--host-password-file", str(password_file)]
    )  # fmt: skip
    auth = cli._remote_auth(args, ["https://node:9400"])
    assert auth == RemoteAuth(tls_files.ca, tls_files.client_cert, tls_files.client_key, "ops", "s3cret-pw")
    monkeypatch.setenv("INFERTOP_HOST_PASSWORD", "from-env")
    args = cli.monitor_parser().parse_args(["--host", "node", "--host-user", "ops"])
    assert cli._remote_auth(args, ["http://node:9400"]).password == "from-env"
    assert "password in clear" in capsys.readouterr().err
    monkeypatch.delenv("INFERTOP_HOST_PASSWORD")

    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    for argv, said in [
        (["--host", "node", "--host-ca", str(not_pem)], f"CA file {not_pem}"),
        (["--host", "node", "--host-key", str(tls_files.client_key)], "--host-key without --host-cert"),
        (["--host-ca", str(tls_files.ca)], "apply to --host or --hosts"),
        (["--host", "node", "--host-password-file", str(password_file)], "without --host-user"),
        (
            ["--host", "node", "--host-user", "u", "--host-password-file", str(tmp_path / "no")],
            "--host-password-file",
        ),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "s3cret" not in err, err
