#!/usr/bin/env bash
# infertop on a real H100/H200, in one prepared run that needs no thinking on the day.
#
#   scripts/gpu-check.sh --prepare             here, before asking for the GPU (about 5 minutes, network)
#   scripts/gpu-check.sh                       on the GPU host (the device tool's third call, below)
#   scripts/gpu-check.sh --rehearse [--out D]  the same steps here, on the CPU build of vLLM (about 12 minutes)
#   scripts/gpu-check.sh ... --steps inventory,serve,bench --budget 300   a subset, a shorter budget
#
# What it runs (scripts/gpu_check.py; each step has its own time limit, the summary says what was skipped):
#   1. inventory  driver, GPUs, GPM; the GPU-marked tests; NVML call costs (benchmarks/monitor_cost.py --real);
#                 what only a real driver shows (benchmarks/nvml_probe.py: process-entry size, power, GPM)
#   2. serve      a Llama-3.2-1B-shaped dummy-weight model in vLLM; `infertop record` from before its start
#   3. bench      `infertop bench` and vLLM's `bench serve`, interleaved, at c=32 and c=256 (128 in / 512 out,
#                 as REFERENCE.md's H100 figures); the monitor captured to SVG during the c=256 pair
#   4. tune       `infertop tune --budget 2` with short phases (--enforce-eager only if three launches at the
#                 measured start-up time would not fit; the summary says so)
#   5. summary    into --out (default $OUT): summary.json, summary.md, recording.ndjson.gz, monitor.svg,
#                 artifacts.tar.gz (every log and result): at most 8 files, as the device tool brings back
#
# The plan on the day: 15 minutes of GPU time in all, the start (1-2 min) included; a machine stays warm only
# 30 s between calls, so make the calls back to back. 13 minutes are planned:
#   here    scripts/gpu-check.sh --prepare   .gpu-stage0..2 (vLLM 0.26.0 for the host, ~58 MiB each) and
#           .gpu-wheels (what infertop needs that the host image lacks: textual and its helpers); it checks
#           that each call's transfer stays under 64 MiB and prints the calls below.
#   call 1  device run, carry [".gpu-stage0"], timeout_s 120:
#             mkdir -p /root/stage && cp .gpu-stage0/* /root/stage/                          (~2 min, the start)
#   call 2  carry [".gpu-stage1"], timeout_s 60:   cp .gpu-stage1/* /root/stage/               (~20 s)
#   call 3  carry [".gpu-stage2", ".gpu-wheels"], timeout_s 600:
#             cp .gpu-stage2/* /root/stage/ && bash /root/stage/install-on-host.sh && scripts/gpu-check.sh
#           about 1 min to install, then the steps inside a 500 s budget                    (~9.5 min)
#   then    give_back; the files come back under files_at. Commit summary.md into BENCHMARKS.md's GPU
#           sections, replace screenshots/demo-h100.ndjson with the real recording (scripts/screenshots.py
#           --keep-recording regenerates the screenshots from it), and fix what the run shows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'gpu-check: %s\n' "$*" >&2; exit 2; }

# infertop's runtime needs that the GPU image (../shared/gpu/gpu-host-packages.txt) lacks; --no-deps each.
HOST_WHEELS=(textual==8.2.8 platformdirs==4.14.8 mdit-py-plugins==0.7.0 linkify-it-py==2.2.0)

prepare() {
    local stage="../shared/gpu/stage-vllm.sh"
    if ! ls -d .gpu-stage0 >/dev/null 2>&1; then
        [[ -x "$stage" ]] || die "no $stage here: stage vLLM by hand as ../shared/gpu/README.md says"
        "$stage"
    fi
    rm -rf .gpu-wheels && mkdir .gpu-wheels
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform any --platform manylinux2014_x86_64 \
        -d .gpu-wheels "${HOST_WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
    grep -qs '^/.gpu-wheels' .git/info/exclude || echo '/.gpu-wheels/' >> .git/info/exclude
    # What travels with every call: the tracked and untracked-not-ignored files, plus the carried folders.
    local tree last n
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
    n=$(ls -d .gpu-stage[0-9]* | wc -l)
    last=".gpu-stage$((n - 1))"
    for d in .gpu-stage[0-9]*; do
        local size extra=""
        size=$(du -sb "$d" | cut -f1)
        [[ "$d" == "$last" ]] && size=$((size + $(du -sb .gpu-wheels | cut -f1))) && extra=' ".gpu-wheels"'
        awk -v d="$d" -v e="$extra" -v b="$((size + tree))" 'BEGIN { printf "gpu-check: call with %s%s: %.1f MiB of 64\n", d, e, b / 1048576 }'
        (( size + tree < 64 * 1048576 )) || die "$d with the tree is over 64 MiB: shrink the tree or split finer"
    done
    cat <<EOF
gpu-check: ready. On the day (status first; each call right after the last):
  run carry [".gpu-stage0"] timeout_s 120: mkdir -p /root/stage && cp .gpu-stage0/* /root/stage/
EOF
    for ((i = 1; i < n - 1; i++)); do
        echo "  run carry [\".gpu-stage$i\"] timeout_s 60: cp .gpu-stage$i/* /root/stage/"
    done
    echo "  run carry [\"$last\", \".gpu-wheels\"] timeout_s 600: cp $last/* /root/stage/ && bash /root/stage/install-on-host.sh && scripts/gpu-check.sh"
}

case "${1:-}" in
    --prepare) prepare; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

if [[ " $* " == *" --rehearse "* ]]; then
    [[ -x .venv/bin/python ]] || die "no .venv: run ./scripts/test.sh once (it makes .venv and .venv-vllm)"
    [[ -x .venv-vllm/bin/python ]] || scripts/setup-vllm-cpu.sh >/dev/null
    exec .venv/bin/python scripts/gpu_check.py "$@"
fi

# On the GPU host: the image's python3 holds torch, nvidia-ml-py, httpx, psutil and pytest; vLLM is under
# /root/site (install-on-host.sh); infertop's other needs come as wheels in .gpu-wheels.
export PYTHONPATH="/root/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! python3 -c "import textual" 2>/dev/null; then
    ls .gpu-wheels/*.whl >/dev/null 2>&1 || die "textual is missing and there is no .gpu-wheels (run --prepare here, carry it)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/infertop-site .gpu-wheels/*.whl
    export PYTHONPATH="/tmp/infertop-site:$PYTHONPATH"
fi
exec python3 scripts/gpu_check.py "$@"
