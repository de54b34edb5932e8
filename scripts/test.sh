#!/usr/bin/env bash
# The test command (README): installs the pinned nvcc when missing, then runs every test. Without a GPU
# the kernels run in the CPU emulator and the GPU runs are skipped with their reason printed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  NVCC=$(bash scripts/install-cuda-toolchain.sh | tail -n 1)
  export NVCC
fi
cargo test "$@"
