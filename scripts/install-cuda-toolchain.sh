#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc from PyPI wheels) into a cache folder and prints the
# path of nvcc on its last line of stdout. Idempotent: a second run only checks the stamp (< 1 s).
#
# Why pinned: the GPU machines run driver 580 (CUDA 13.0). A newer nvcc emits PTX that driver
# cannot load, and an unpinned nvidia-nvvm makes ptxas fail with "Unsupported .version".
# cuobjdump and nvdisasm (read-only tools, for scripts/perf-bound.sh) are 13.2: they read 13.0 cubins.
#
# Usage: scripts/install-cuda-toolchain.sh            # prints e.g. /root/.cache/lora-kernels/cuda-13.0/venv/.../nvcc
#        NVCC=$(scripts/install-cuda-toolchain.sh | tail -n 1)
# Env:   LK_TOOLCHAIN_DIR  where to install (default ${XDG_CACHE_HOME:-$HOME/.cache}/lora-kernels/cuda-13.0)
#        PYTHON            the python3 to create the venv with (default python3)
set -euo pipefail

PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
      nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86)
dir=${LK_TOOLCHAIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-kernels/cuda-13.0}
py=${PYTHON:-python3}
stamp="$dir/installed.txt"
want="${PINS[*]}"

find_nvcc() { find "$dir/venv" -path '*nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n 1; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && nvcc=$(find_nvcc) && [ -n "$nvcc" ]; then
  echo "$nvcc"; exit 0
fi

echo "installing CUDA 13.0 nvcc wheels into $dir" >&2
rm -rf "$dir/venv"; mkdir -p "$dir"
"$py" -m venv "$dir/venv" >&2
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}" >&2
nvcc=$(find_nvcc)
[ -n "$nvcc" ] || { echo "error: nvcc not found after installing ${PINS[*]}" >&2; exit 1; }
# ptxas and the other tools live beside nvcc; make sure they are executable (wheels keep modes, but be safe)
chmod +x "$(dirname "$nvcc")"/* 2>/dev/null || true
"$nvcc" --version >&2
echo "$want" > "$stamp"
echo "$nvcc"
