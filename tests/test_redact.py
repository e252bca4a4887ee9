"""Secrets are masked at the source: command lines and URLs (tuner/redact.py)."""

from __future__ import annotations

import pytest

from tuner.redact import MASK, is_secret_name, redact_argv, redact_command, redact_text, redact_url

SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "serve", "m", "--api-key", SECRET],
        ["vllm", "serve", "m", f"--api-key={SECRET}"],
        ["python", "-m", "srv", "--hf-token", SECRET],
        ["python", "srv.py", "--db-password", SECRET],
        ["python", "srv.py", "--client-secret", SECRET],
        ["python", "srv.py", "--apikey", SECRET],
        [f"HF_TOKEN={SECRET}", "python", "serve.py"],
        [f"MY_SETTING={SECRET}", "python", "serve.py"],
        ["curl", f"http://user:{SECRET}@host:8000/v1"],
        ["curl", "-H", f"Authorization: Bearer {SECRET}"],
        ["python", "x.py", SECRET],  # a known token shape, even as a bare argument
    ],
)
def test_every_secret_is_masked(argv: list[str]) -> None:
    out = redact_argv(argv)
    assert SECRET not in " ".join(out)
    assert MASK in " ".join(out)
    assert len(out) == len(argv)


def test_what_is_not_secret_stays() -> None:
    argv = [
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--max-num-batched-tokens", "8192",
        "--tokenizer", "meta-llama/Llama-3.1-8B", "--kv-cache-dtype", "fp8", "--ssl-keyfile", "/etc/k.pem",
        "--port", "8000",
    ]  # fmt: skip
    assert redact_argv(argv) == argv


def test_a_secret_flag_without_a_value_does_not_eat_the_next_flag() -> None:
    assert redact_argv(["srv", "--use-token", "--port", "8000"]) == ["srv", "--use-token", "--port", "8000"]


@pytest.mark.parametrize("name", ["--api-key", "HF_TOKEN", "password", "--x-auth", "access_token", "apikey"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["--max-num-batched-tokens", "--tokenizer", "--port", "--keep-alive", "--model"]
)
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_url_loses_its_credentials_and_secret_query_values() -> None:
    assert redact_url(f"http://user:{SECRET}@gpu-1:8000/v1") == "http://gpu-1:8000/v1"
    out = redact_url(f"https://gpu-1/metrics?api_key={SECRET}&x=1")
    assert SECRET not in out and "x=1" in out and out.startswith("https://gpu-1/metrics?")
    assert redact_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_joined_command_line() -> None:
    assert redact_command(f"vllm serve m --api-key {SECRET} --port 8000") == (
        f"vllm serve m --api-key {MASK} --port 8000"
    )


def test_named_values_in_free_text() -> None:
    line = f"INFO non-default args: {{'model': 'm', 'api_key': '{SECRET}', 'max_num_batched_tokens': 8192}}"
    out = redact_text(line)
    assert SECRET not in out and "'api_key': '***'" in out and "'max_num_batched_tokens': 8192" in out
    assert redact_text("password=hunter2 port=80") == "password=*** port=80"
    assert redact_text("'api_key': None") == "'api_key': None"


def test_hostile_text_is_masked_in_linear_time() -> None:
    import time

    started = time.perf_counter()
    redact_text("a" * 200_000)
    redact_text("x://" * 50_000)
    assert time.perf_counter() - started < 1.0
