"""After the search: prove the exported file and check the winner as production would run it.

* **Proof**: vLLM is relaunched from the exported ``--config`` YAML alone (plus the run's fixed arguments) and
  measured again at the winning concurrency: the file really starts a server that performs like the trial.
* **Production check**: on that same server, requests arrive at random (Poisson) at 75 % of the winner's
  maximum request rate, the load a production server should be sized for, and the p95 latencies are reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.loadgen import LoadMode, LoadSpec
from tuner.measure import measure_phase
from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer
from tuner.tuning import events as ev
from tuner.tuning.search import PointResult
from tuner.tuning.slo import check

if TYPE_CHECKING:
    from tuner.tuning.tune import Tuner

PROOF_KEY = "proof"
PROOF_TOLERANCE = 0.15  # a relaunch on the same machine measures within 15 % (CPU noise included)


def prove_and_check(
    tuner: Tuner, yaml_path: Path, best: PointResult
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Relaunch from ``yaml_path``; measure at ``best.concurrency``; then the production check. Never raises."""
    cfg = tuner.config
    spec = ServerSpec(
        model=cfg.model,
        args=("--config", str(yaml_path), *cfg.fixed_args),
        command=cfg.command,
        env=dict(cfg.env),
        startup_timeout_s=cfg.startup_timeout_s,
        log_path=cfg.out_dir / "logs" / "proof.log",
    )
    label = f"proof: relaunched from {yaml_path.name}"
    tuner._emit(
        ev.TrialStarted(PROOF_KEY, label, {"config": str(yaml_path)}, tuner.launches + 1, "prove the export")
    )
    server = VllmServer(spec)
    try:
        server.start()
    except LaunchError as exc:
        tuner._emit(ev.TrialFinished(PROOF_KEY, label, "failed", exc.summary, log_tail=exc.log_tail))
        return {"yaml": str(yaml_path), "passed": False, "error": exc.summary}, None
    # The proof is one launch beyond the search budget; it is not counted against it.
    proof: dict[str, Any] | None = None
    production: dict[str, Any] | None = None
    try:
        tuner._emit(ev.ServerReady(PROOF_KEY, server.url, server.startup_s or 0.0, server.pid))
        tuner._watch(server.url)
        if cfg.prove:
            proof = _prove(tuner, server, yaml_path, best)
        if cfg.production_check and not tuner._cancel.is_set():
            production = _production(tuner, server, best)
    finally:
        tuner._watch(None)
        server.stop()
    ok = bool(proof and proof.get("passed"))
    reason = f"{proof['ratio']:.2f}x the trial's tok/s" if proof and proof.get("ratio") else "not measured"
    tuner._emit(ev.TrialFinished(PROOF_KEY, label, "feasible" if ok else "failed", reason))
    return proof, production


def _spec(tuner: Tuner, concurrency: int | None, rate: float | None, num_requests: int) -> LoadSpec:
    cfg = tuner.config
    return LoadSpec(
        mode=LoadMode.RATE if rate else LoadMode.CONCURRENCY,
        concurrency=concurrency,
        request_rate_per_s=rate,
        num_requests=num_requests,
        warmup_requests=min(concurrency or 8, 32),
        input_len=cfg.input_len,
        output_len=cfg.output_len,
        vocab_size=cfg.vocab_size,
        seed=1,  # other prompts than the search's
    )


def _prove(tuner: Tuner, server: VllmServer, yaml_path: Path, best: PointResult) -> dict[str, Any]:
    cfg = tuner.config
    c = best.concurrency
    stats = best.summary.get("stats", {})
    rate = stats.get("requests_per_s") or 0.0
    # As long as the trial's phase at this load lasted (or min_phase_s), so the two measure the same thing.
    num = max(cfg.min_requests, cfg.requests_per_stream * c, int(rate * cfg.min_phase_s + 0.5))
    spec = _spec(tuner, c, None, num)
    phase = asyncio.run(
        measure_phase(server.url, spec, sampler=tuner.sampler, server_pid=server.pid, cancel=tuner._cancel)
    )
    verdict = check(cfg.slo, phase.load.stats)
    ratio = (
        phase.load.stats.output_tokens_per_s / best.output_tokens_per_s if best.output_tokens_per_s else None
    )
    return {
        "yaml": str(yaml_path),
        "startup_s": server.startup_s,
        "concurrency": c,
        "output_tokens_per_s": phase.load.stats.output_tokens_per_s,
        "trial_output_tokens_per_s": best.output_tokens_per_s,
        "ratio": ratio,
        "passed": bool(verdict.passed and ratio is not None and ratio >= 1 - PROOF_TOLERANCE),
        "slo_reasons": list(verdict.reasons),
        "error": None,
    }


def _production(tuner: Tuner, server: VllmServer, best: PointResult) -> dict[str, Any]:
    from tuner.tuning.tune import PRODUCTION_FRACTION

    stats = best.summary.get("stats", {})
    max_rate = stats.get("requests_per_s") or 0.0
    if max_rate <= 0:
        return {"fraction_of_max": PRODUCTION_FRACTION, "error": "the winner's request rate is unknown"}
    rate = PRODUCTION_FRACTION * max_rate
    # Steady traffic for three phase lengths (30 s by default).
    num = max(tuner.config.min_requests * 2, int(rate * 3 * tuner.config.min_phase_s))
    spec = _spec(tuner, None, rate, num)
    phase = asyncio.run(
        measure_phase(server.url, spec, sampler=tuner.sampler, server_pid=server.pid, cancel=tuner._cancel)
    )
    verdict = check(tuner.config.slo, phase.load.stats)
    return {
        "fraction_of_max": PRODUCTION_FRACTION,
        "request_rate_per_s": rate,
        "stats": {k: v for k, v in dataclasses.asdict(phase.load.stats).items() if k != "errors"},
        "passed": verdict.passed,
        "slo_reasons": list(verdict.reasons),
        "error": None,
    }
