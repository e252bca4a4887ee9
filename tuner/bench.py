"""`infertop bench`: measure a vLLM server (running, or launched for the purpose) over one or more phases.

Each phase's results are written to the results file as soon as the phase ends, so an interrupt (Ctrl-C or
SIGTERM, which set ``cancel``), a crash of the server or of the client never loses finished phases. The file is
private and written whole (:mod:`tuner.outputs`), and never replaces one that was there before the bench.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.loadgen import LoadgenError, LoadMode, LoadSpec, PhaseProgress
from tuner.loadgen.dataset import served_max_model_len
from tuner.loadgen.vocab import vocab_size_from_dir, vocab_size_from_server
from tuner.loadgen.workload import Workload, WorkloadError, for_server
from tuner.measure import MeasuredPhase, measure_phase
from tuner.outputs import OutputError, write_private
from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer
from tuner.telemetry.model import GpuState, SystemInfo
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.sampler import LaunchedServer, LiveSource, Sampler, SamplerConfig

# When neither the model's files nor the server tell the vocabulary: ids below 1000 are valid in every real
# tokenizer (tiny test models have 259 and up, and say so in their config.json).
FALLBACK_VOCAB_SIZE = 1000
_MIN_VOCAB_SIZE = 10  # LoadSpec's own minimum


class BenchError(RuntimeError):
    """A bench that could not run (or not go on); the message is one line for people."""


def _check_fits(plan: BenchPlan, context: int | None) -> None:
    """Fixed lengths the server must refuse are never sent: a refusal would count against the server's error
    rate for what the bench asked wrongly. (A ``--workload`` is drawn within the context instead.)"""
    if context is None:
        return
    r = plan.len_range_ratio
    longest = math.ceil(plan.input_len * (1 + r)) + math.ceil(plan.output_len * (1 + r))
    if longest <= context:
        return
    lengths = f"--input-len {plan.input_len} + --output-len {plan.output_len}" + (f" (±{r:g})" if r else "")
    raise BenchError(
        f"requests of up to {longest} tokens ({lengths}) exceed the server's {context}-token context, which "
        "would refuse them: give shorter lengths, or a --workload (drawn within the context)"
    )


@dataclass(frozen=True)
class BenchPlan:
    """What to measure: the load shape and the phases (one per concurrency, or one per request rate)."""

    input_len: int = 128
    output_len: int = 128
    len_range_ratio: float = 0.0
    concurrencies: tuple[int, ...] = (1, 8, 32)
    request_rates: tuple[float, ...] = ()  # Poisson phases instead of closed-loop ones when given
    num_requests: int | None = None  # default: 8 per stream, at least 16
    duration_s: float | None = None
    warmup_requests: int | None = None  # default: one per stream, at most 32
    seed: int = 0
    vocab_size: int | None = None  # prompts use token ids below this; None: read it from the model or server
    model: str | None = None
    ttft_max_s: float | None = None
    tpot_max_s: float | None = None
    workload: Workload | None = None  # lengths and shared prefixes drawn per request (replaces the above)

    def specs(self, vocab_size: int) -> Iterator[LoadSpec]:
        """One spec per phase. Each phase has its own seed (``seed`` + its place): the same prompts in two
        phases would let the server's prefix cache answer the second from the first."""
        if self.request_rates:
            for i, rate in enumerate(self.request_rates):
                yield LoadSpec(
                    mode=LoadMode.RATE,
                    concurrency=None,
                    request_rate_per_s=rate,
                    num_requests=self.num_requests or max(16, int(rate * 30)),
                    duration_s=self.duration_s,
                    warmup_requests=self.warmup_requests or 4,
                    input_len=self.input_len,
                    output_len=self.output_len,
                    len_range_ratio=self.len_range_ratio,
                    vocab_size=vocab_size,
                    seed=self.seed + i,
                    workload=self.workload,
                )
            return
        for i, c in enumerate(self.concurrencies):
            yield LoadSpec(
                mode=LoadMode.CONCURRENCY,
                concurrency=c,
                num_requests=None if self.duration_s else (self.num_requests or max(16, 8 * c)),
                duration_s=self.duration_s,
                warmup_requests=self.warmup_requests if self.warmup_requests is not None else min(32, c),
                input_len=self.input_len,
                output_len=self.output_len,
                len_range_ratio=self.len_range_ratio,
                vocab_size=vocab_size,
                seed=self.seed + i,
                workload=self.workload,
            )


@dataclass
class BenchReport:
    """Every phase of one bench, plus where and on what it ran. Saved after each phase."""

    endpoint: str
    model: str | None
    system: SystemInfo | None
    launched: dict[str, Any] | None = None
    vocab_size: int | None = None  # prompt token ids were drawn below this
    vocab_source: str | None = None  # where that size came from, for people
    phases: list[MeasuredPhase] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False
    started_s: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        from tuner.telemetry.model import to_jsonable

        return {
            "format": "infertop-bench",
            "version": 1,
            "endpoint": self.endpoint,
            "model": self.model,
            "started_s": self.started_s,
            "system": to_jsonable(self.system) if self.system else None,
            "launched": self.launched,
            "vocab_size": self.vocab_size,
            "vocab_source": self.vocab_source,
            "error": self.error,
            "interrupted": self.interrupted,
            "phases": [p.to_dict() for p in self.phases],
        }


@dataclass
class ResultsFile:
    """Where a bench's results go, written whole and private (0600) after every phase.

    The first write may not replace a file that is there (unless ``force``): the CLI refused an existing one
    before measuring, and this holds even for one created since. Later writes replace the bench's own file.
    """

    path: Path
    force: bool = False
    written: bool = False

    def save(self, report: BenchReport) -> None:
        """Write ``report``; :class:`~tuner.outputs.OutputError` (one line) when it cannot be."""
        text = json.dumps(report.to_dict(), indent=1)
        try:
            write_private(self.path, text, force=self.force or self.written)
        except OSError as error:  # a write that failed midway (disk full): the partial file was discarded
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from None
        self.written = True


ProgressFn = Callable[[int, int, LoadSpec, PhaseProgress], None]
PhaseDoneFn = Callable[[int, MeasuredPhase], None]


def make_sampler(url: str, *, with_gpus: bool = True) -> Sampler:
    """GPU + host + this server's /metrics at 4 Hz (the server at 1 Hz), no discovery of other servers."""
    config = SamplerConfig(discover_vllm=False, history_len=16)
    backend = NvmlBackend() if with_gpus else None
    return Sampler(LiveSource(backend, config=config, vllm_urls=[url]), history_len=16)


def find_vocab_size(
    endpoint: str, plan: BenchPlan, launch: ServerSpec | None = None
) -> tuple[int | None, str]:
    """The vocabulary size for prompt token ids, and where it came from (or why it is unknown: None).

    An explicit ``plan.vocab_size`` wins; then the launched model's directory; then the server itself.
    """
    if plan.vocab_size is not None:
        return plan.vocab_size, "given"
    if launch is not None and Path(launch.model).is_dir():
        size = vocab_size_from_dir(launch.model)
        if size is not None and size >= _MIN_VOCAB_SIZE:
            return size, f"model files in {launch.model}"
    size, source = vocab_size_from_server(endpoint, plan.model)
    if size is not None and size < _MIN_VOCAB_SIZE:
        return None, f"{source} gave {size}, too few"
    return size, source


def run_bench(
    endpoint: str | None,
    plan: BenchPlan,
    results_path: Path,
    *,
    launch: ServerSpec | None = None,
    with_gpus: bool = True,
    on_progress: ProgressFn | None = None,
    on_phase_done: PhaseDoneFn | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    force: bool = False,
) -> BenchReport:
    """Measure ``endpoint``, or launch ``launch`` first (and always stop it). Never leaves a server running.

    Results go to ``results_path`` after every phase and once more at the end, however the bench ends; a file
    already there is replaced only with ``force``."""
    cancel = cancel or threading.Event()
    status = on_status or (lambda _msg: None)
    results = ResultsFile(results_path, force=force)
    server: VllmServer | None = None
    report = BenchReport(endpoint=endpoint or "", model=plan.model, system=None)
    try:
        if launch is not None:
            status(f"launching vLLM: {' '.join(launch.argv(0)[:6])} …")
            server = VllmServer(launch, cancelled=cancel.is_set)
            server.start()
            endpoint = server.url
            report.endpoint = endpoint
            report.launched = {
                "argv": list(launch.argv(server.port)),
                "startup_s": server.startup_s,
                "log": str(server.log_path),
            }
            status(f"vLLM ready at {endpoint} after {server.startup_s:.0f} s")
        assert endpoint is not None
        found, source = find_vocab_size(endpoint, plan, launch)
        if found is None:
            status(
                f"warning: vocabulary size unknown ({source}); prompt token ids drawn below "
                f"{FALLBACK_VOCAB_SIZE}: give --vocab-size if the server rejects them"
            )
            source = f"fallback ({source})"
        else:
            status(f"vocabulary: {found} token ids ({source})")
        report.vocab_size, report.vocab_source = found or FALLBACK_VOCAB_SIZE, source
        plan = dataclasses.replace(plan, vocab_size=report.vocab_size)
        if plan.workload is None:
            _check_fits(plan, served_max_model_len(endpoint, plan.model))
        else:
            workload, notes = for_server(plan.workload, endpoint, plan.model, report.vocab_size)
            for note in notes:
                status(note)
            if notes:
                status(f"workload {workload.describe()}")
            plan = dataclasses.replace(plan, workload=workload)
        sampler = make_sampler(endpoint, with_gpus=with_gpus)
        if server is not None and server.pid is not None and isinstance(sampler.source, LiveSource):
            # The server bench launched: its processes and model, for the decode estimate where nothing
            # measures the bandwidth (its GPUs from NVML's process lists).
            sampler.source.set_engine_urls([endpoint], {endpoint: LaunchedServer(server.pid, server.argv)})
        report.system = sampler.open()
        if report.system.state is not GpuState.OK:
            status(f"no GPU telemetry: {report.system.message}")
        sampler.start()
        try:
            asyncio.run(
                _run_phases(
                    endpoint, plan, report, results, sampler, server, on_progress, on_phase_done, cancel
                )
            )
        finally:
            sampler.stop()
    except LaunchError as exc:
        report.error = exc.summary
        report.launched = {"error": exc.summary, "kind": exc.kind.value, "log_tail": exc.log_tail}
    except (LoadgenError, WorkloadError) as exc:
        report.error = str(exc)
    except KeyboardInterrupt:
        report.interrupted = True
        report.error = "interrupted"
    finally:
        if server is not None:
            status("stopping vLLM")
            server.stop()
        report.interrupted = report.interrupted or cancel.is_set()
        try:
            results.save(report)
        except OutputError as exc:
            status(str(exc))
            report.error = report.error or str(exc)
    return report


async def _run_phases(
    endpoint: str,
    plan: BenchPlan,
    report: BenchReport,
    results: ResultsFile,
    sampler: Sampler,
    server: VllmServer | None,
    on_progress: ProgressFn | None,
    on_phase_done: PhaseDoneFn | None,
    cancel: threading.Event,
) -> None:
    specs: Sequence[LoadSpec] = list(plan.specs(plan.vocab_size or FALLBACK_VOCAB_SIZE))
    model = plan.model
    for i, spec in enumerate(specs):
        if cancel.is_set():
            break

        def progress(p: PhaseProgress, i: int = i, spec: LoadSpec = spec) -> None:
            if on_progress is not None:
                on_progress(i, len(specs), spec, p)

        phase = await measure_phase(
            endpoint,
            spec,
            sampler=sampler,
            server_pid=server.pid if server else None,
            model=model,
            ttft_max_s=plan.ttft_max_s,
            tpot_max_s=plan.tpot_max_s,
            on_progress=progress,
            cancel=cancel,
        )
        model = phase.load.model
        report.model = model
        report.phases.append(phase)
        try:
            results.save(report)
        except OutputError as exc:
            report.error = f"{exc}: stopped after phase {i + 1}"  # measuring on would keep nothing
            break
        if on_phase_done is not None:
            on_phase_done(i, phase)
        if phase.load.aborted:
            report.error = f"phase {i + 1} stopped: {phase.load.aborted}"
            break
        if server is not None and not server.is_running():
            report.error = f"the vLLM server exited during phase {i + 1}: {server.log_tail(3).strip()[-200:]}"
            break
        stats = phase.load.stats
        if stats.requests_failed and not stats.requests_ok and not phase.load.cancelled:
            # Every request failed: later phases would fail the same way (a prompt id out of vocabulary, an
            # unknown model, a length over the limit), so stop and show the server's own words.
            example = stats.errors[0].example if stats.errors else "no message"
            report.error = f"phase {i + 1}: all {stats.requests_failed} requests failed: " + " ".join(
                example.split()
            )
            break
