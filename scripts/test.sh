#!/usr/bin/env bash
# The test command (README): installs the pinned nvcc when missing, then runs every test (scripts/test_*.py
# too). Without a GPU the kernels run in the CPU emulator and the GPU runs are skipped with their reason
# printed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  NVCC=$(bash scripts/install-cuda-toolchain.sh | tail -n 1)
  export NVCC
fi
# the speed bound's model of the sm_90a one-launch kernels against simulations of their loops (no build)
python3 -m unittest discover -s scripts -p 'test_*.py'
cargo test "$@"
