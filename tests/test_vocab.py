"""The vocabulary size for token-id prompts: from a model directory, from a server, and `infertop bench` using it.

The real-vLLM tests share one server on a model with a 513-token vocabulary (below the 1000 that bench used to
assume), and launch one more through `infertop bench --launch`.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import VLLM_TEST_ARGS, VLLM_TEST_ENV, SpecFactory, serving
from fakes.sse_server import EmitterConfig, EmitterProcess

from tuner.bench import FALLBACK_VOCAB_SIZE, BenchPlan, BenchReport, find_vocab_size, run_bench
from tuner.loadgen.vocab import _tokenize_bound, vocab_size_from_dir, vocab_size_from_server
from tuner.serving.launcher import ServerSpec, VllmServer
from tuner.serving.tinymodel import tokenizer_json, write_tiny_model

# --- from a model directory ---------------------------------------------------------------------------------


def _write(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))


def test_a_tiny_model_directory_gives_its_vocab_size(tmp_path: Path) -> None:
    assert vocab_size_from_dir(write_tiny_model(tmp_path, vocab_size=513)) == 513


def test_config_alone_and_a_multimodal_text_config(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", {"vocab_size": 32000})
    assert vocab_size_from_dir(tmp_path) == 32000
    _write(tmp_path / "config.json", {"model_type": "llava", "text_config": {"vocab_size": 32064}})
    assert vocab_size_from_dir(tmp_path) == 32064


def test_the_smaller_of_config_and_tokenizer_wins(tmp_path: Path) -> None:
    # Padded embeddings (config larger than the tokenizer): vLLM may reject ids past the tokenizer's last one.
    _write(tmp_path / "config.json", {"vocab_size": 640})
    _write(tmp_path / "tokenizer.json", tokenizer_json(600))
    assert vocab_size_from_dir(tmp_path) == 600
    _write(tmp_path / "config.json", {"vocab_size": 300})
    assert vocab_size_from_dir(tmp_path) == 300


def test_added_tokens_past_the_vocab_count_and_unigram_lists(tmp_path: Path) -> None:
    _write(
        tmp_path / "tokenizer.json",
        {"model": {"vocab": {"a": 0, "b": 41}}, "added_tokens": [{"id": 99, "content": "<x>"}]},
    )
    assert vocab_size_from_dir(tmp_path) == 100
    _write(tmp_path / "tokenizer.json", {"model": {"type": "Unigram", "vocab": [["a", 0.0]] * 250}})
    assert vocab_size_from_dir(tmp_path) == 250


def test_nothing_readable_is_none(tmp_path: Path) -> None:
    assert vocab_size_from_dir(tmp_path / "missing") is None
    (tmp_path / "config.json").write_text("{not json")
    _write(tmp_path / "tokenizer.json", {"model": {"vocab": {}}})
    assert vocab_size_from_dir(tmp_path) is None
    _write(tmp_path / "config.json", {"vocab_size": "many", "text_config": None})
    assert vocab_size_from_dir(tmp_path) is None


# --- from a server (a small stand-in) ---------------------------------------------------------------------

Routes = dict[str, tuple[int, Any]]  # "GET /v1/models" -> (status, JSON document, or bytes sent as is)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: Routes = {}
    seen: list[tuple[str, Any]] = []

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append((f"{method} {self.path}", body))
        status, document = self.routes.get(f"{method} {self.path}", (404, {"detail": "Not Found"}))
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Handler]]]:
    """A local HTTP server answering from ``handler.routes``; yields its URL and the handler class."""
    handler = type("Handler", (_Handler,), {"routes": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _models(*entries: tuple[str, str]) -> tuple[int, Any]:
    return 200, {"object": "list", "data": [{"id": i, "object": "model", "root": r} for i, r in entries]}


def test_server_root_that_is_a_local_directory_is_read(
    fake_server: tuple[str, type[_Handler]], tmp_path: Path
) -> None:
    url, handler = fake_server
    model_dir = write_tiny_model(tmp_path / "m", vocab_size=513)
    handler.routes["GET /v1/models"] = _models(("tiny", str(model_dir)))
    assert vocab_size_from_server(url + "/v1") == (513, f"config.json of {model_dir}")
    assert [path for path, _ in handler.seen] == ["GET /v1/models"]


def test_server_tokenize_gives_the_largest_id_plus_one(fake_server: tuple[str, type[_Handler]]) -> None:
    url, handler = fake_server
    handler.routes["GET /v1/models"] = _models(("first", "org/first"), ("second", "/not/here"))
    handler.routes["POST /tokenize"] = (200, {"count": 3, "max_model_len": 512, "tokens": [1, 7000, 42]})
    assert vocab_size_from_server(url, "second") == (7001, "the server's /tokenize")
    _path, body = handler.seen[-1]
    assert body["model"] == "second" and len(body["prompt"]) > 200


@pytest.mark.parametrize(
    ("routes", "why"),
    [
        ({"GET /v1/models": (500, {"error": {"message": "engine dead"}})}, "HTTP 500: engine dead"),
        ({"GET /v1/models": (200, b"<html>")}, "did not answer JSON"),
        ({"GET /v1/models": (200, {"data": []})}, "lists no model"),
        ({"GET /v1/models": _models(("a", "/nowhere"))}, "/tokenize answered HTTP 404"),
        ({"GET /v1/models": _models(("a", "/nowhere")), "POST /tokenize": (200, {"tokens": []})}, "no token"),
    ],
)
def test_server_failures_are_none_and_a_reason(
    fake_server: tuple[str, type[_Handler]], routes: Routes, why: str
) -> None:
    url, handler = fake_server
    handler.routes.update(routes)
    size, reason = vocab_size_from_server(url)
    assert size is None and why in reason and "\n" not in reason


def test_a_model_the_server_does_not_serve(fake_server: tuple[str, type[_Handler]]) -> None:
    url, handler = fake_server
    handler.routes["GET /v1/models"] = _models(("a", "/nowhere"))
    size, reason = vocab_size_from_server(url, "b")
    assert size is None and "'b'" in reason


def test_no_server_and_a_bad_url_are_none() -> None:
    size, reason = vocab_size_from_server("http://127.0.0.1:9", timeout_s=2.0)
    assert size is None and "cannot reach" in reason
    size, reason = vocab_size_from_server("ftp://example")
    assert size is None and "not an http(s) URL" in reason


# --- where `infertop bench` takes it from ------------------------------------------------------------------


def test_bench_takes_an_explicit_size_then_the_launched_directory_then_the_server(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "m", vocab_size=300)
    unreachable = "http://127.0.0.1:9"
    assert find_vocab_size(unreachable, BenchPlan(vocab_size=2000), ServerSpec(str(model_dir))) == (
        2000,
        "given",
    )
    assert find_vocab_size(unreachable, BenchPlan(), ServerSpec(str(model_dir))) == (
        300,
        f"model files in {model_dir}",
    )
    size, why = find_vocab_size(unreachable, BenchPlan(), ServerSpec("org/not-a-directory"))
    assert size is None and "cannot reach" in why  # run_bench then warns and uses FALLBACK_VOCAB_SIZE


# --- run_bench against a fast stand-in server: the fallback, and a phase where every request failed ---------


def _run_bench_on_emitter(tmp_path: Path, **knobs: Any) -> tuple[BenchReport, list[str]]:
    messages: list[str] = []
    plan = BenchPlan(input_len=8, output_len=4, concurrencies=(1, 2), num_requests=4, warmup_requests=0)
    with EmitterProcess(EmitterConfig(**knobs)) as emitter:
        report = run_bench(
            emitter.base_url, plan, tmp_path / "bench.json", with_gpus=False, on_status=messages.append
        )
    return report, messages


def test_an_unknown_vocab_size_falls_back_with_one_warning(tmp_path: Path) -> None:
    report, messages = _run_bench_on_emitter(tmp_path)  # no model root, no /tokenize
    warnings = [m for m in messages if m.startswith("warning: vocabulary size unknown")]
    assert len(warnings) == 1 and "/tokenize answered HTTP 404" in warnings[0]
    assert f"below {FALLBACK_VOCAB_SIZE}" in warnings[0] and "\n" not in warnings[0]
    assert report.error is None and report.vocab_size == FALLBACK_VOCAB_SIZE
    assert report.vocab_source and report.vocab_source.startswith("fallback (")
    assert [p.load.spec.vocab_size for p in report.phases] == [FALLBACK_VOCAB_SIZE] * 2


def test_a_phase_where_every_request_failed_ends_the_bench_with_the_servers_message(tmp_path: Path) -> None:
    report, _ = _run_bench_on_emitter(tmp_path, reject_every=1)
    assert report.error == "phase 1: all 4 requests failed: HTTP 400: rejected by the fake emitter"
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["phases"]) == 1 and saved["error"] == report.error


def test_a_phase_where_some_requests_failed_goes_on(tmp_path: Path) -> None:
    report, _ = _run_bench_on_emitter(tmp_path, reject_every=2)
    assert report.error is None and len(report.phases) == 2
    assert all(p.load.stats.requests_ok and p.load.stats.requests_failed for p in report.phases)


# --- `infertop bench` on a real vLLM serving a 513-token vocabulary -----------------------------------------

SMALL_VOCAB = 513  # below the 1000 that bench assumed: ids 100..899 would be out of vocabulary
_BENCH_ARGS = ("--concurrency", "1,2", "--num-requests", "4", "--input-len", "32", "--output-len", "8")


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("vocab-513"), vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="module")
def small_vocab_server(
    vllm_spec: SpecFactory, small_vocab_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """One vLLM on the 513-token model, shared by this module's tests."""
    log_path = tmp_path_factory.mktemp("vocab-513-server") / "server.log"
    with serving(vllm_spec(small_vocab_model, log_path=log_path)) as server:
        yield server


def _bench(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", "--no-gpu", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, **VLLM_TEST_ENV},
    )


# First in the module, so that the launched server does not share the CPUs with the module's own one.
@pytest.mark.vllm
def test_bench_launch_reads_the_vocab_size_from_the_model_directory(
    vllm_python: Path, small_vocab_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    run = _bench(
        "--launch", str(small_vocab_model), "--vllm-python", str(vllm_python), *_BENCH_ARGS,
        "--out", str(out), "--", *VLLM_TEST_ARGS, timeout_s=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"vocabulary: {SMALL_VOCAB} token ids (model files in {small_vocab_model})" in run.stderr
    saved = json.loads(out.read_text())
    assert saved["vocab_size"] == SMALL_VOCAB
    assert [p["stats"]["requests_ok"] for p in saved["phases"]] == [4, 4]


@pytest.mark.vllm
def test_vocab_size_from_a_real_vllm(small_vocab_server: VllmServer, small_vocab_model: Path) -> None:
    assert vocab_size_from_server(small_vocab_server.url) == (
        SMALL_VOCAB,
        f"config.json of {small_vocab_model}",
    )
    # Where the model's files are not on this machine, /tokenize gives a bound: every id below it is valid.
    with httpx.Client(base_url=small_vocab_server.url, timeout=10.0) as client:
        bound, source = _tokenize_bound(client, None)
    assert 100 < bound <= SMALL_VOCAB and source == "the server's /tokenize"


@pytest.mark.vllm
def test_bench_endpoint_asks_the_server_for_the_vocab_size(
    small_vocab_server: VllmServer, small_vocab_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    run = _bench("--endpoint", small_vocab_server.url, *_BENCH_ARGS, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"vocabulary: {SMALL_VOCAB} token ids (config.json of {small_vocab_model})" in run.stderr
    saved = json.loads(out.read_text())
    assert [p["stats"]["requests_ok"] for p in saved["phases"]] == [4, 4]
    assert all(p["spec"]["vocab_size"] == SMALL_VOCAB for p in saved["phases"])


@pytest.mark.vllm
def test_an_explicit_vocab_size_too_large_fails_the_bench_with_the_servers_message(
    small_vocab_server: VllmServer, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    run = _bench(
        "--endpoint", small_vocab_server.url, *_BENCH_ARGS, "--vocab-size", "1000", "--out", str(out)
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "vocabulary: 1000 token ids (given)" in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    # vLLM 0.32 answers a streamed request 200 and sends the error as an event; older ones answer HTTP 400.
    assert last.startswith("infertop bench: phase 1: all 4 requests failed: "), last
    assert re.search(r"Token id \d+ is out of vocabulary", last), last
    saved = json.loads(out.read_text())
    assert len(saved["phases"]) == 1  # the failed phase is kept; the next one never ran
    assert saved["phases"][0]["stats"]["requests_failed"] == 4 and saved["error"] in last
