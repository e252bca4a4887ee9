"""Several tunes of the same model in a row, one command: do they name the same winner, and does each verdict hold?

    .venv/bin/python benchmarks/tune_repeat.py [--runs 3] [--out DIR] [--vllm-python PY] [-- infertop tune args]

Each run is the real command a user types, on the tiny dummy-weight model and the CPU build of vLLM, with a
fresh trial store: ``infertop tune MODEL --cpu --headless --slo ttft=0.5,tps=30 --budget 3`` (the issue's
tune; lengths 512 in / 256 out by default), plus whatever follows ``--``. From each report.json it reads the
winner, its capacity, the proof (its throughput against the trial's, and its decision), the production check
at the exported operating point, the verdict and the exit code. It then checks what issue 7 asks of a verdict:
every proof within +/-10 % of its trial and meeting the SLO, every production check holding, and the runs
naming the same winner or reporting a tie. Prints Markdown; the reports stay in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.serving.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
TUNE = ("--cpu", "--headless", "--slo", "ttft=0.5,tps=30", "--budget", "3", "--pin", "max-model-len=1024")
FIXED = ("--load-format", "dummy", "--enforce-eager")


def one_run(i: int, model: Path, out: Path, python: Path, extra: list[str]) -> dict[str, Any]:
    run_dir = out / f"run{i}"
    started = time.time()
    with open(out / f"run{i}.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "tui.cli", "tune", str(model), *TUNE, "--store", str(run_dir / "trials.sqlite"),
             "--out", str(run_dir), "--vllm-python", str(python), *extra, "--", *FIXED],
            cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=log, check=False,
        )  # fmt: skip
    row: dict[str, Any] = {"run": i, "exit_code": done.returncode, "wall_min": (time.time() - started) / 60}
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        row["error"] = f"no report (exit {done.returncode}); see {out}/run{i}.log"
        return row
    verdict = report.get("verdict") or {}
    attempts = verdict.get("attempts") or []
    chosen = next(
        (a for a in attempts if a.get("key") == verdict.get("key")), attempts[-1] if attempts else {}
    )
    proof = chosen.get("proof") or {}
    checks = chosen.get("checks") or []
    held = next((c for c in checks if c.get("decision") == "pass"), None)
    trial = next((t for t in report.get("trials", []) if t.get("key") == report.get("winner")), {})
    row.update(
        winner=verdict.get("label") or report.get("winner"),
        capacity=(trial.get("capacity") or {}).get("describe"),
        proof_ratio=chosen.get("proof_ratio"),
        proof_decision=proof.get("decision"),
        proof_ok=chosen.get("proof_ok"),
        operating_point=(held or {}).get("load", {}).get("label"),
        check_decisions=[c.get("decision") for c in checks],
        check_ttft=(held or {}).get("steady", {}).get("ttft_p95_s"),
        check_ttft_ci=(held or {}).get("steady", {}).get("ttft_p95_ci_s"),
        status=verdict.get("status"),
        headline=report.get("headline"),
        ties=report.get("ties") or [],
        ranking=report.get("ranking") or [],
        launches=report.get("launches"),
    )
    return row


def main() -> int:
    own, extra = (sys.argv[1:], []) if "--" not in sys.argv else (
        sys.argv[1 : sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :]
    )  # fmt: skip
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/infertop-tune-repeat"))
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args(own)
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(args.out / "model")
    rows = []
    for i in range(1, args.runs + 1):
        rows.append(one_run(i, model, args.out, args.vllm_python, extra))
        print(f"run {i}: {rows[-1].get('headline') or rows[-1].get('error')}", file=sys.stderr)
    (args.out / "tune-repeat.json").write_text(json.dumps(rows, indent=1) + "\n")

    print(f"machine: {platform.node()} {platform.machine()}; date {time.strftime('%Y-%m-%d')}")
    print(f"command: {' '.join(sys.argv)}\n")
    columns = ("run", "winner", "capacity (search)", "proof vs trial", "production check (operating point)")
    print("| " + " | ".join((*columns, "verdict", "exit", "min")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | {r['error']} | | | | | {r['exit_code']} | {r['wall_min']:.0f} |")
            continue
        ratio = "n/a" if r["proof_ratio"] is None else f"{r['proof_ratio']:.2f}x, {r['proof_decision']}"
        ci = r["check_ttft_ci"]
        ttft = "" if r["check_ttft"] is None else f"; TTFT p95 {r['check_ttft']:.2f} s"
        if ci:
            ttft += f" ({ci[0]:.2f}-{'?' if ci[1] is None else f'{ci[1]:.2f}'})"
        checks = " then ".join(r["check_decisions"])
        print(
            f"| {r['run']} | {r['winner']} | {r['capacity']} | {ratio} | {r['operating_point']}: {checks}{ttft} "
            f"| {r['status']} | {r['exit_code']} | {r['wall_min']:.0f} |"
        )
    good = [r for r in rows if "error" not in r]
    proofs = all(r["proof_ok"] for r in good) and len(good) == len(rows)
    checks_hold = all(r["check_decisions"][:1] == ["pass"] for r in good) and len(good) == len(rows)
    winners = {r["winner"] for r in good}
    tied = any(r["ties"] for r in good)
    print(
        f"\n- every proof within +/-10 % of its trial and meeting the SLO: **{'yes' if proofs else 'no'}**"
        f"\n- every production check holding at 75 % of capacity (no back-off): **{'yes' if checks_hold else 'no'}**"
        f"\n- the same winner: **{'yes' if len(winners) == 1 else 'no'}** ({', '.join(sorted(map(str, winners)))})"
        + (" — ties reported: " + "; ".join(t for r in good for t in r["ties"]) if tied else "")
    )
    return 0 if proofs and checks_hold and (len(winners) == 1 or tied) else 1


if __name__ == "__main__":
    sys.exit(main())
