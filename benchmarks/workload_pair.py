"""Two workloads, one model: does the tuner pick a different configuration for each, and why?

    .venv/bin/python benchmarks/workload_pair.py [--out DIR] [--vllm-python PY] [--budget N]

Runs the real command twice on the tiny dummy-weight model and the CPU build of vLLM, each with a fresh trial
store and the same candidate ladder (``--values max-num-seqs=8,16,32`` beyond vLLM's defaults, budget 4):

- **stream**: short prompts, long answers read as they stream (``in=uniform:32:96,out=normal:128:16``) under
  a per-user speed floor with room on TTFT (``ttft=2,tps=40``): per-user speed, so the batch size, binds;
- **prefill**: long prompts, one-line answers (``in=uniform:300:500,out=8``) under a tight TTFT
  (``ttft=0.5``), no speed floor: prefill and queueing bind.

From each report.json it reads the winner, every trial's capacity, the verdict and the exit code, and prints
Markdown: the winners side by side, and each ranking, so that a tie says which trials it joins.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.serving.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
FIXED = ("--load-format", "dummy", "--enforce-eager")
WORKLOADS = {
    "stream": ("in=uniform:32:96,out=normal:128:16", "ttft=2,tps=40"),
    "prefill": ("in=uniform:300:500,out=8", "ttft=0.5"),
    "stream-strict": (
        "in=uniform:32:96,out=normal:128:16",
        "ttft=2,tps=120",
    ),  # a floor the batch must protect
}


def one_tune(name: str, model: Path, out: Path, python: Path, budget: int, run: int) -> dict[str, Any]:
    workload, slo = WORKLOADS[name]
    name = f"{name}-{run}"  # a workload may be asked for twice: each run its own store
    run_dir = out / name
    started = time.time()
    with open(out / f"{name}.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "tui.cli", "tune", str(model), "--cpu", "--headless", "--workload", workload,
             "--slo", slo, "--values", "max-num-seqs=8,16,32", "--budget", str(budget),
             "--store", str(run_dir / "trials.sqlite"), "--out", str(run_dir), "--vllm-python", str(python),
             "--", *FIXED],
            cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=log, check=False,
        )  # fmt: skip
    row: dict[str, Any] = {"name": name, "workload": workload, "slo": slo, "exit_code": done.returncode}
    row["wall_min"] = (time.time() - started) / 60
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        row["error"] = f"no report (exit {done.returncode}); see {out}/{name}.log"
        return row
    verdict = report.get("verdict") or {}
    trials = []
    for t in report.get("trials", []):
        capacity = (t.get("capacity") or {}).get("describe") or t.get("reason") or t.get("status")
        trials.append((t.get("label") or t.get("key"), t.get("status"), capacity))
    row.update(
        winner=verdict.get("label") or report.get("winner"),
        status=verdict.get("status"),
        headline=report.get("headline"),
        ties=report.get("ties") or [],
        trials=trials,
        launches=report.get("launches"),
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/infertop-workload-pair"))
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument(
        "--only", default="stream,prefill", help="which workloads, in order (default: the pair)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(args.out / "model")
    rows = []
    for i, name in enumerate(args.only.split(","), 1):
        rows.append(one_tune(name, model, args.out, args.vllm_python, args.budget, i))
        print(f"{name}: {rows[-1].get('headline') or rows[-1].get('error')}", file=sys.stderr)
    (args.out / "workload-pair.json").write_text(json.dumps(rows, indent=1) + "\n")

    print(f"machine: {platform.node()} {platform.machine()}; date {time.strftime('%Y-%m-%d')}")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| workload | SLO | winner | verdict | exit | launches | min |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(
                f"| {r['workload']} | {r['slo']} | {r['error']} | | {r['exit_code']} | | {r['wall_min']:.0f} |"
            )
            continue
        print(
            f"| {r['workload']} | {r['slo']} | {r['winner']} | {r['status']} | {r['exit_code']} "
            f"| {r['launches']} | {r['wall_min']:.0f} |"
        )
    for r in rows:
        if "error" in r:
            continue
        print(f"\n**{r['name']}** ({r['workload']}, SLO {r['slo']}): {r['headline']}\n")
        for label, status, capacity in r["trials"]:
            print(f"- {label}: {status}, {capacity}")
        for tie in r["ties"]:
            print(f"- tie: {tie}")
    # The same configuration but for the max-model-len each workload sets is the same winner.
    winners = {re.sub(r",? ?\(?len \d+\)?", "", str(r.get("winner"))) for r in rows if "error" not in r}
    print(f"\n- different winners: **{'yes' if len(winners) > 1 else 'no'}**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
