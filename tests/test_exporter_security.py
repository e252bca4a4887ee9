"""The exporter locked and held by no one: TLS, client certificates and basic auth from an exporter-toolkit web
config (a real Prometheus scrapes through them), only its three paths, the Host check on loopback, idle and
trickling peers timed out, its inputs refused in one line, and no secret on the wire."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from helpers import FixedHost
from hypothesis import given
from hypothesis import strategies as st

from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.httpmessage import Request, parse_request
from tuner.telemetry.model import EngineSample, GpuProcess, Snapshot
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig
from tuner.telemetry.webconfig import WebConfig, WebConfigError, load_web_config

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "prometheus", "s3cret-pass"
SECRET = "tok3n-f00"


# --- certificates, a web config, an exporter --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certs:
    folder: Path
    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    stranger: Path  # a client certificate signed by another CA
    stranger_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)


def _signed(folder: Path, name: str, ca: str, extensions: str) -> None:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        folder, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"
    )
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            folder, "req", "-x509", "-new", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=infertop test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    _signed(
        folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _signed(folder, "client", "ca", "subjectAltName=DNS:prometheus.test\nextendedKeyUsage=clientAuth\n")
    _signed(
        folder, "stranger", "other-ca", "subjectAltName=DNS:prometheus.test\nextendedKeyUsage=clientAuth\n"
    )
    f = folder
    return Certs(
        f, f / "ca.pem", f / "server.pem", f / "server.key", f / "client.pem", f / "client.key",
        f / "stranger.pem", f / "stranger.key",
    )  # fmt: skip


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()  # 4: the cheapest, for tests


def _web_config(certs: Certs, extra_tls: str = "", users: bool = True) -> WebConfig:
    text = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n" + extra_tls
    if users:
        text += f"basic_auth_users:\n  {USER}: {_hash(PASSWORD)}\n"
    path = certs.folder / f"web-{abs(hash(text))}.yml"
    path.write_text(text)
    return load_web_config(path)


def _exporter(**kwargs: Any) -> Exporter:
    """A real exporter over a scripted 2-GPU machine, on a free loopback port, after 8 readings."""
    clock = scripted.ManualClock()
    config = SamplerConfig(discover_vllm=False)
    backend = scripted.scripted_backend(scripted.h100_sxm(2, clock=clock))
    source = LiveSource(backend, config=config, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    exporter = Exporter(Sampler(source, history_len=8), port=0, version="test", clock=clock, **kwargs)
    exporter.start(sampling=False)
    for _ in range(8):
        clock.advance(0.25)
        exporter.sampler.tick()
    return exporter


@pytest.fixture
def plain() -> Iterator[Exporter]:
    exporter = _exporter()
    yield exporter
    exporter.stop()


def _base(exporter: Exporter) -> str:
    return exporter.url.removesuffix("/metrics")


def _tls_client(certs: Certs, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- TLS, client certificates, basic auth ----------------------------------------------------------------


def test_a_real_prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_refused(
    certs: Certs, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus server is not installed (scripts/test.sh installs Debian's package)")
        pytest.skip("the prometheus server is not installed (apt install prometheus)")
    exporter = _exporter(web_config=_web_config(certs))
    assert exporter.url.startswith("https://")
    target = f"127.0.0.1:{exporter.port}"
    jobs = ""
    for job, password in (("infertop", PASSWORD), ("intruder", "guessed")):
        jobs += (
            f"  - job_name: {job}\n    scheme: https\n    tls_config:\n      ca_file: {certs.ca}\n"
            f"    basic_auth:\n      username: {USER}\n      password: {password}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def query(promql: str) -> list[dict[str, Any]]:
        try:
            response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
            return response.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    try:
        deadline = time.monotonic() + 45
        power: list[dict[str, Any]] = []
        ups: dict[str, str] = {}
        while time.monotonic() < deadline:
            power = query('infertop_gpu_power_watts{job="infertop"}')
            ups = {r["metric"]["job"]: r["value"][1] for r in query("up")}
            if len(power) == 2 and len(ups) == 2:
                break
            time.sleep(0.5)
        assert len(power) == 2, "Prometheus stored no power series over TLS with basic auth within 45 s"
        latest = exporter.sampler.latest
        assert latest is not None
        by_gpu = {s.index: s for s in latest.gpus}
        for series in power:
            assert float(series["value"][1]) == pytest.approx(by_gpu[int(series["metric"]["gpu"])].power_w)
        assert ups == {"infertop": "1", "intruder": "0"}  # the wrong password scrapes nothing
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
        exporter.stop()


def test_without_the_right_password_every_path_answers_401_with_a_challenge(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuner.telemetry.webconfig as webconfig

    exporter = _exporter(web_config=_web_config(certs))
    checks = []
    real_checkpw = webconfig.bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", counted)
    base = _base(exporter)
    try:
        with httpx.Client(verify=_tls_client(certs), timeout=5) as client:
            for path in ("/metrics", "/snapshot.json", "/", "/other"):
                for auth in (None, (USER, "wrong"), ("nobody", PASSWORD), (USER, PASSWORD.upper())):
                    refused = client.get(base + path, auth=auth)
                    assert refused.status_code == 401, (path, auth)
                    assert refused.headers["www-authenticate"].startswith("Basic realm=")
                    assert "infertop_gpu" not in refused.text
            checks.clear()
            for _ in range(5):
                assert client.get(base + "/metrics", auth=(USER, PASSWORD)).status_code == 200
            # A scrape a second costs one bcrypt, not one per scrape: the verdict is cached.
            assert len(checks) == 1
            assert client.get(base + "/other", auth=(USER, PASSWORD)).status_code == 404
        with pytest.raises(httpx.TransportError):  # without TLS, no answer at all
            httpx.get(exporter.url.replace("https://", "http://"), auth=(USER, PASSWORD), timeout=5)
    finally:
        exporter.stop()


def test_with_mtls_a_client_without_a_certificate_signed_by_the_ca_is_refused(certs: Certs) -> None:
    mtls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
    exporter = _exporter(web_config=_web_config(certs, mtls, users=False))
    try:
        for context in (
            _tls_client(certs),
            _tls_client(certs, cert=certs.stranger, key=certs.stranger_key),
        ):
            with pytest.raises(httpx.TransportError):
                httpx.get(exporter.url, verify=context, timeout=5)
        client = _tls_client(certs, cert=certs.client, key=certs.client_key)
        assert httpx.get(exporter.url, verify=client, timeout=5).status_code == 200
    finally:
        exporter.stop()
    # Only the names listed in client_allowed_sans, when it is given.
    other = _exporter(
        web_config=_web_config(certs, mtls + "  client_allowed_sans: [scraper.test]\n", users=False)
    )
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(other.url, verify=client, timeout=5)
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: Maybe\n",
         "tls_server_config.client_auth_type"),
        ("tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n", "tls_server_config.cert_file"),
        ("tls_server_config:\n  cert_file: server.pem\n", "tls_server_config.key_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS14\n",
         "tls_server_config.min_version"),
        ("tls_server_config:\n  cert_file: ca.key\n  key_file: server.key\n", "cert_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: "
         "RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: "
         "RequireAnyClientCert\n  client_ca_file: ca.pem\n", "tls_server_config.client_auth_type"),
        ("basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice"),
        ("basic_auth_user:\n  alice: x\n", "basic_auth_user"),
        ("rate_limit:\n  interval: 1s\n  burst: 20\n", "rate_limit"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "http_server_config.headers"),
        ("tls_server_config: [1, 2]\n", "tls_server_config"),
        ("basic_auth_users:\n  alice: x: y\n", "line 2"),
    ],
)  # fmt: skip
def test_a_bad_web_config_names_its_file_and_field(certs: Certs, text: str, field: str) -> None:
    path = certs.folder / "bad.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert str(path) in message and field in message and "\n" not in message


# --- what is served, and to which Host --------------------------------------------------------------------


def test_only_metrics_snapshot_and_an_index_are_served(plain: Exporter) -> None:
    base = _base(plain)
    index = httpx.get(base + "/", timeout=5)
    assert (
        index.status_code == 200 and 'href="metrics"' in index.text and 'href="snapshot.json"' in index.text
    )
    assert httpx.get(base + "/metrics", timeout=5).status_code == 200
    assert httpx.get(base + "/snapshot.json", timeout=5).json()["format"] == 1
    for path in ("/other", "/metrics/", "/favicon.ico", "/snapshot.json/x", "/metrics.txt"):
        missing = httpx.get(base + path, timeout=5)
        assert missing.status_code == 404, path
        assert "infertop_gpu" not in missing.text
    assert httpx.post(base + "/metrics", timeout=5).status_code == 405
    head = httpx.head(base + "/metrics", timeout=5)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 1000


def test_on_loopback_a_host_header_naming_another_machine_is_refused(plain: Exporter) -> None:
    # DNS rebinding: a page from evil.example, its name rebound to 127.0.0.1, asks with Host: evil.example.
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.1.2.3"):
        refused = httpx.get(plain.url, headers={"Host": host}, timeout=5)
        assert refused.status_code == 403, host
        assert "infertop_gpu" not in refused.text
    for host in ("localhost", f"localhost:{plain.port}", "127.0.0.1", "[::1]:80", "LOCALHOST."):
        assert httpx.get(plain.url, headers={"Host": host}, timeout=5).status_code == 200, host


def _raw(exporter: Exporter, data: bytes, *, shut: bool = False) -> bytes:
    """What the exporter answers ``data`` sent on a connection of its own (``shut``: then half-closed)."""
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_a_malformed_or_oversized_request_is_refused_and_the_exporter_goes_on(plain: Exporter) -> None:
    for data, status in (
        (b"hello\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", b"400"),
        (b"GET http://evil.example/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n", b"400"),
    ):
        assert _raw(plain, data).startswith(b"HTTP/1.1 " + status), data[:60]
    # Two requests in one write are two answers; a client that half-closes after its request is answered.
    two = _raw(
        plain,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nGET /x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        shut=True,
    )
    assert two.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 404" in two
    assert _raw(plain, b"GET /metrics HTTP/1.0\r\n\r\n", shut=True).startswith(b"HTTP/1.1 200")
    assert httpx.get(plain.url, timeout=5).status_code == 200


@given(st.binary(max_size=600) | st.text(max_size=600).map(lambda t: t.encode("latin-1", "replace")))
def test_any_request_head_parses_to_a_request_or_a_reason(head: bytes) -> None:
    parsed = parse_request(head)
    assert isinstance(parsed, (Request, str))


# --- peers that hold connections ---------------------------------------------------------------------------


def _limit_descriptors_to_1024() -> None:
    """systemd's default soft limit for a service: the exporter as it runs on a GPU node."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _closed_by_peer(socks: list[socket.socket], at_least: int, seconds: float) -> int:
    """How many of ``socks`` the other side closes within ``seconds`` (waiting no longer once ``at_least`` are)."""
    closed = 0
    with selectors.DefaultSelector() as watching:
        for s in socks:
            watching.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while closed < at_least and time.monotonic() < deadline:
            for key, _ in watching.select(0.1):
                watching.unregister(key.fileobj)
                try:
                    gone = key.fileobj.recv(1) == b""  # type: ignore[union-attr]
                except ConnectionError:
                    gone = True
                closed += gone
    return closed


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_a_thousand_idle_connections_do_not_delay_a_scrape() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this side holds the 1,000
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    port = _free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "exporter", "--simulate", "h100x8", "--listen", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_limit_descriptors_to_1024,
    )  # fmt: skip
    idle: list[socket.socket] = []
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape(client: httpx.Client) -> float:
        started = time.perf_counter()
        try:
            response = client.get(url)
        except httpx.TimeoutException:
            pytest.fail("a scrape beside 1,000 idle connections got no answer within 5 s")
        assert response.status_code == 200 and "infertop_gpu_power_watts" in response.text
        return time.perf_counter() - started

    try:
        _line(exporter.stderr, "serving", 20)
        # Each scrape on a new connection, as Prometheus makes after the exporter closed its idle one.
        with httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            scrape(client)  # the client's own first-time costs are not the exporter's
            with selectors.DefaultSelector() as pending:
                for _ in range(1000):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    idle.append(s)
                    pending.register(s, selectors.EVENT_WRITE)
                # While they arrive: no SYN of the scrape dropped on a full listen queue (a 1 s retransmission).
                during = scrape(client)
                deadline = time.monotonic() + 5
                connected = 0
                while connected < len(idle) and time.monotonic() < deadline:
                    for key, _ in pending.select(0.2):
                        pending.unregister(key.fileobj)
                        connected += 1
            # The exporter holds 512 (its cap under a limit of 1,024 descriptors): the longest idle go.
            let_go = _closed_by_peer(idle, at_least=1000 - 512, seconds=3)
            held = [scrape(client) for _ in range(3)]  # and beside those it holds
            threads = _threads(exporter.pid)
        assert during < 0.5, f"a scrape while 1,000 connections arrived took {during * 1000:.0f} ms"
        assert max(held) < 0.1, f"a scrape beside 1,000 idle connections took {max(held) * 1000:.0f} ms"
        assert let_go >= 1000 - 512, f"the exporter let {let_go} of 1,000 idle connections go"
        assert threads < 100  # an idle connection costs no thread
    finally:
        for s in idle:
            s.close()
        exporter.terminate()
        exporter.wait(timeout=10)


def _closed_within(sock: socket.socket, seconds: float, trickle: bool = False) -> bool:
    """Whether the exporter closes ``sock`` within ``seconds`` (sending it a byte every 0.1 s if ``trickle``)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    request = iter(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.send(bytes([next(request)]))
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_an_idle_or_trickling_connection_is_closed_at_the_request_deadline(certs: Certs) -> None:
    exporter = _exporter(request_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", exporter.port)) as silent:
            assert _closed_within(silent, 3.0)
        with socket.create_connection(("127.0.0.1", exporter.port)) as trickling:
            # A byte every 0.1 s: each read is quick, the whole request never comes.
            assert _closed_within(trickling, 3.0, trickle=True)
    finally:
        exporter.stop()
    # With TLS, a client that never says hello holds nothing either: others are served meanwhile.
    tls = _exporter(web_config=_web_config(certs, users=False), request_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", tls.port)) as silent:
            started = time.perf_counter()
            assert httpx.get(tls.url, verify=_tls_client(certs), timeout=5).status_code == 200
            assert time.perf_counter() - started < 0.5
            assert _closed_within(silent, 3.0)
    finally:
        tls.stop()


# --- secrets on the wire ------------------------------------------------------------------------------------


def test_url_credentials_process_owners_and_command_lines_stay_off_the_wire(plain: Exporter) -> None:
    # What the sampler reads of `--vllm http://admin:SECRET@host` (a server not answering) and of a process
    # started with its key on the command line.
    vllm = f"http://admin:{SECRET}@127.0.0.1:8000"
    snap = plain.sampler.latest
    assert snap is not None
    process = GpuProcess(
        pid=4242, gpu_index=0, vram_used_bytes=2**30, kind="compute", user="alice-the-owner",
        name="python3", command=f"vllm serve --api-key sk-{SECRET}",
    )  # fmt: skip
    gpus = (dataclasses.replace(snap.gpus[0], processes=(process,)), *snap.gpus[1:])
    dead = EngineSample(url=vllm, time_s=snap.time_s, error=f"not reachable ({vllm}/metrics)")
    live = EngineSample(
        url=vllm.replace("8000", "8001"), time_s=snap.time_s, engine="vllm", requests_running=1.0
    )
    plain.sampler.latest = Snapshot(snap.time_s, snap.host, gpus, (dead, live))
    metrics = httpx.get(plain.url, timeout=5).text
    published = httpx.get(_base(plain) + "/snapshot.json", timeout=5).text
    assert 'url="http://127.0.0.1:8000"' in metrics and 'url="http://127.0.0.1:8001"' in metrics
    assert 'pid="4242"' in metrics and 'process="python3"' in metrics
    body = json.loads(published)
    processes = [p for g in body["snapshot"]["gpus"] for p in g.get("processes", ())]
    assert {
        "pid": 4242,
        "gpu_index": 0,
        "vram_used_bytes": 2**30,
        "kind": "compute",
        "name": "python3",
    } in processes
    assert all("user" not in p and "command" not in p for p in processes)
    engines = body["snapshot"]["engines"]
    assert [e["url"] for e in engines] == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    for page in (metrics, published):
        assert SECRET not in page and "admin" not in page
        assert "alice-the-owner" not in page and "--api-key" not in page


# --- the command line ----------------------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 15, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", "exporter", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, input=stdin,
    )  # fmt: skip


@pytest.mark.parametrize("interval", ["nan", "inf", "0", "-1", "1e-9", "1e9"])
def test_an_interval_that_is_not_a_sane_number_of_seconds_is_refused_in_one_line(interval: str) -> None:
    bad = _cli("--simulate", "h100x1", "--listen", "127.0.0.1:0", "--interval", interval)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--interval" in bad.stderr and "0.01" in bad.stderr and "Traceback" not in bad.stderr


def test_an_exporter_refuses_an_interval_that_would_make_staleness_infinite() -> None:
    with pytest.raises(ValueError, match="interval"):
        _exporter(interval_s=float("inf"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its death is the point
def test_when_the_sampler_thread_dies_telemetry_goes_down_within_a_finite_time() -> None:
    class Dying(LiveSource):
        def next_delay_s(self) -> float:
            raise SystemExit  # the sampler thread ends, whatever it catches

    clock = scripted.ManualClock()
    backend = scripted.scripted_backend(scripted.h100_sxm(1, clock=clock))
    source = Dying(backend, config=SamplerConfig(discover_vllm=False), host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    exporter = Exporter(Sampler(source), port=0, clock=clock, interval_s=60)
    exporter.start()
    try:
        deadline = time.monotonic() + 5
        while exporter.sampler.latest is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "infertop_gpu_telemetry_up 1.0" in httpx.get(exporter.url, timeout=5).text
        assert exporter.collector.stale_after_s == 180
        clock.advance(181)
        down = httpx.get(exporter.url, timeout=5).text
    finally:
        exporter.stop()
    assert "infertop_gpu_telemetry_up 0.0" in down and "no reading for 181 s" in down


def _line(stream: Any, pattern: str, seconds: float) -> str:
    """The first line of ``stream`` matching ``pattern`` within ``seconds`` (else all that was read)."""
    seen = ""
    with selectors.DefaultSelector() as waiting:
        waiting.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if waiting.select(max(0.0, deadline - time.monotonic())):
                line = stream.readline()
                if not line:
                    break
                seen += line
                if re.search(pattern, line):
                    return line
    raise AssertionError(f"no line matching {pattern!r} within {seconds} s: {seen!r}")


@pytest.mark.parametrize(
    ("listen", "stop"),
    [("PORT", signal.SIGTERM), ("[::ffff:127.0.0.1]:PORT", signal.SIGINT)],
    ids=["port-alone-sigterm", "ipv4-mapped-loopback-sigint"],
)
def test_the_command_serves_a_port_alone_on_loopback_locked_by_its_web_config_and_stops_on_a_signal(
    certs: Certs, listen: str, stop: signal.Signals
) -> None:
    port = _free_port()
    web = _web_config(certs)
    assert web.path is not None
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tui.cli", "exporter", "--simulate", "h100x1",
            "--listen", listen.replace("PORT", str(port)), "--web-config", str(web.path),
        ],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        serving = _line(proc.stderr, "serving", 20)
        host = "127.0.0.1" if listen == "PORT" else "[::ffff:127.0.0.1]"
        assert f"serving https://{host}:{port}/metrics" in serving
        url = f"https://127.0.0.1:{port}/metrics"
        context = _tls_client(certs)
        assert httpx.get(url, verify=context, auth=(USER, PASSWORD), timeout=5).status_code == 200
        assert httpx.get(url, verify=context, auth=(USER, "wrong"), timeout=5).status_code == 401
        proc.send_signal(stop)
        assert proc.wait(timeout=10) == 0
        rest = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in rest and "!" not in serving + rest  # loopback: no warning
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_web_config_stops_the_command_in_one_line(certs: Certs) -> None:
    path = certs.folder / "typo.yml"
    path.write_text("tls_server_config:\n  cert_file: server.pem\n  key_fle: server.key\n")
    bad = _cli("--simulate", "h100x1", "--listen", "127.0.0.1:0", "--web-config", str(path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert str(path) in bad.stderr and "tls_server_config.key_fle" in bad.stderr


def test_hash_password_prints_a_bcrypt_hash_a_web_config_accepts() -> None:
    made = _cli("--hash-password", stdin="correct horse\n")
    assert made.returncode == 0, made.stderr
    hashed = made.stdout.strip()
    assert bcrypt.checkpw(b"correct horse", hashed.encode())
