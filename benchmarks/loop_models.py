"""Closed loop or open loop for the tuner's default objective? One config, both capacities, and the check at 75 %.

    .venv/bin/python benchmarks/loop_models.py [--vllm-python .venv-vllm/bin/python] [--out DIR] [--quick]

For one configuration (vLLM's defaults of the CPU build, the tiny dummy-weight model), on one running server,
with the tuner's own trial runner (client and server on separate cores, steady windows, 90 % intervals):

1. closed-loop capacity: the most concurrent users within the SLO (``--objective users``), and the request
   rate those users achieved;
2. open-loop capacity: the highest Poisson arrival rate within the SLO (``--objective rate``);
3. for each, a production check in Poisson arrivals at 75 % of that capacity (for the closed loop: of the rate
   its users were served at), held at least 30 s. A closed-loop capacity that overstates what a server holds
   when requests arrive on their own shows here.

Two workloads: the issue's tune (512 in / 256 out) and short requests (64 in / 32 out). SLO TTFT p95 <= 0.5 s,
>= 30 tok/s per user. Prints Markdown and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.serving.affinity import pin_process, plan_cpus
from tuner.serving.launcher import api_server_command
from tuner.serving.tinymodel import write_tiny_model
from tuner.tuning.capacity import CapacityPlan, find_capacity
from tuner.tuning.points import RATE, USERS, Load, Point
from tuner.tuning.runner import MeasurePlan, TrialRunner
from tuner.tuning.slo import parse_slo

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
FIXED = ("--load-format", "dummy", "--enforce-eager", "--max-model-len", "1024")
SLO = "ttft=0.5,tps=30"
FRACTION = 0.75
WORKLOADS = ((512, 256), (64, 32))


def _figures(p: Point | None) -> dict[str, Any]:
    if p is None:
        return {}
    s = p.steady
    return {
        "load": p.load.label(),
        "decision": p.decision,
        "requests_per_s": s.requests_per_s,
        "output_tokens_per_s": s.output_tokens_per_s,
        "ttft_p95_s": s.ttft_p95_s,
        "ttft_p95_ci_s": s.ttft_p95_ci_s,
        "tpot_p95_s": s.tpot_p95_s,
        "requests": s.requests_ok,
        "phases": s.phases,
        "disturbed": p.disturbed,
        "why": p.why(),
    }


def one_workload(
    python: Path, model: Path, in_len: int, out_len: int, out: Path, quick: bool
) -> dict[str, Any]:
    plan = MeasurePlan(
        input_len=in_len, output_len=out_len, vocab_size=1024, min_phase_s=5.0 if quick else 10.0
    )
    runner = TrialRunner(
        model=str(model), slo=parse_slo(SLO), plan=plan, command=api_server_command(python), fixed_args=FIXED,
        env=ENV, startup_timeout_s=300, log_dir=out / "logs", cpu_plan=plan_cpus("auto", cpu_build=True),
        cpu_build=True,
    )  # fmt: skip
    result: dict[str, Any] = {"workload": f"{in_len} in / {out_len} out"}
    with runner.serve("defaults", (), f"loop-models-{in_len}") as session:
        for objective in (USERS, RATE):
            t0 = time.time()
            cap = find_capacity(session.measure, CapacityPlan(objective=objective, max_users=128))
            best = cap.best
            entry: dict[str, Any] = {
                "capacity": cap.describe(),
                "best": _figures(best),
                "ceiling": _figures(cap.ceiling),
                "search_s": time.time() - t0,
                "points": len(cap.points),
            }
            if best is not None and best.requests_per_s > 0:
                # As the tuner's production check: 75 % of the load found; for a closed loop the rate its users
                # were served at (requests completed per second), since Poisson arrivals need a rate.
                rate = best.load.value if best.load.open_loop else best.requests_per_s
                check = session.measure(Load.rate(FRACTION * rate), "production")
                entry["check"] = _figures(check)
            result[objective] = entry
            print(
                f"{result['workload']} {objective}: {cap.describe()}; check: {entry.get('check')}",
                file=sys.stderr,
            )
    return result


def _fmt(d: dict[str, Any], key: str, scale: float = 1.0, digits: int = 2) -> str:
    value = d.get(key)
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/infertop-loop-models"))
    parser.add_argument("--quick", action="store_true", help="5 s phases instead of 10 s")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(args.out / "model")
    cpus = plan_cpus("auto", cpu_build=True)
    with pin_process(cpus.client):
        results = [one_workload(args.vllm_python, model, i, o, args.out, args.quick) for i, o in WORKLOADS]
    (args.out / "loop-models.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"machine: {platform.node()} {platform.machine()}, {cpus.note}; date {time.strftime('%Y-%m-%d')}")
    print(f"command: {' '.join(sys.argv)}; SLO {SLO}\n")
    print(
        "| workload | load model | capacity | its request rate, req/s | TTFT p95 there, s | "
        "check: Poisson at 75 % of that rate | check TTFT p95, s (90 % interval) | check holds? |"
    )
    print("|---|---|---|---:|---:|---|---:|---|")
    for r in results:
        for objective, name in ((USERS, "closed loop (users)"), (RATE, "open loop (Poisson)")):
            e = r[objective]
            b, c = e["best"], e.get("check", {})
            ci = c.get("ttft_p95_ci_s")
            ci_text = "" if not ci else f" ({ci[0]:.2f}-{'?' if ci[1] is None else f'{ci[1]:.2f}'})"
            print(
                f"| {r['workload']} | {name} | {e['capacity']} | {_fmt(b, 'requests_per_s')} | "
                f"{_fmt(b, 'ttft_p95_s')} | {c.get('load', 'n/a')} | {_fmt(c, 'ttft_p95_s')}{ci_text} | "
                f"{c.get('decision', 'n/a')}{'' if c.get('decision') == 'pass' else ': ' + str(c.get('why'))}"
                f"{' (disturbed: ' + c['disturbed'] + ')' if c.get('disturbed') else ''} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
