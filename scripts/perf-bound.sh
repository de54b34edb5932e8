#!/usr/bin/env bash
# The speed bound from the compiled code (scripts/perf_bound.py): resources, occupancy and hot-loop SASS
# of every kernel on sm_80 and sm_90, and a lower bound on each headline op against its target. Needs
# a build with nvcc (its ptxas reports and fatbins in OUT_DIR) and cuobjdump + nvdisasm, which
# scripts/install-cuda-toolchain.sh installs beside nvcc. No GPU.
#
# Usage: scripts/perf-bound.sh            # prints the markdown
#        scripts/perf-bound.sh --write    # also writes docs/perf/bound.md
#        scripts/perf-bound.sh --check    # prints, and says whether docs/perf/bound.md is current
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-$(bash scripts/install-cuda-toolchain.sh | tail -n 1)}
bin=$(dirname "$nvcc")
[ -x "$bin/cuobjdump" ] && [ -x "$bin/nvdisasm" ] || { echo "no cuobjdump/nvdisasm beside $nvcc"; exit 1; }
target_dir=$(bash scripts/target-dir.sh)
# the build that wrote its fused GEMM last among those with sm_80 and sm_90 code, the bound's two tables (a
# target directory holds one build directory per configuration; a rebuild rewrites the files in place, so
# the directories' own times say nothing; a build for other architectures, e.g. LK_CUDA_ARCHS=80, is passed)
cuda=
for fatbin in $(ls -t "$target_dir"/*/build/lora-kernels-*/out/cuda/fused_gemm.fatbin 2>/dev/null || true); do
  report="$(dirname "$fatbin")/ptxas/fused_gemm.txt"
  if [ -f "$report" ] && grep -q "for 'sm_80'" "$report" && grep -q "for 'sm_90'" "$report"; then
    cuda=$(dirname "$fatbin"); break
  fi
done
[ -n "$cuda" ] || { echo "no nvcc build with sm_80 and sm_90 code under $target_dir: build with the default LK_CUDA_ARCHS first"; exit 1; }
out=$(PATH="$bin:$PATH" python3 scripts/perf_bound.py --cuda-dir "$cuda" --cuobjdump "$bin/cuobjdump" --kernels-dir kernels)
printf '%s\n' "$out"
case "${1:-}" in
  --write) printf '%s\n' "$out" > docs/perf/bound.md; echo "wrote docs/perf/bound.md" >&2 ;;
  --check)
    if [ "$(cat docs/perf/bound.md 2>/dev/null)" = "$out" ]; then echo "docs/perf/bound.md is current" >&2
    else echo "warning: docs/perf/bound.md differs from this build's bound (refresh: scripts/perf-bound.sh --write)" >&2
    fi ;;
esac
