#!/usr/bin/env bash
# Nsight Compute over one call of each of our kernels on the headline layer and the cuBLAS GEMMs they
# are compared with (examples/profile_step.rs), for when a kernel misses its target (docs/perf says
# why it matters). Writes into --out DIR: ncu.log (the one-line summary per kernel), ncu-summary.csv (one
# row per kernel: time, SM, memory and L2 throughput, registers, occupancy, DRAM bytes read and written),
# ncu-details.txt (every section, text) and profile_step.ncu-rep (open with ncu-ui). `--clock-control
# none`: ncu leaves the GPU's clocks as it finds them (by default it locks them to base clock), so the
# card's settings are not touched; its kernel times are still of kernels replayed one at a time, not the
# perf table's (use them for the counters, the table for the times).
#
#   bash scripts/gpu-profile.sh --out DIR               from the repository (builds the example)
#   bash scripts/gpu-profile.sh --out DIR --bin PATH    with a built profile_step (gpu-check.sh --profile
#                                                       passes it, in the repository or a packed folder)
set -u
results=./gpu-profile-out bin=
while [ $# -gt 0 ]; do
  case $1 in
    --out) results=${2:?--out needs a directory}; shift 2 ;;
    --bin) bin=${2:?--bin needs a path}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-profile: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$results" && results=$(cd "$results" && pwd) || exit 2
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$bin" ]; then
  cd "$here/.."
  command -v cargo >/dev/null || { echo "gpu-profile: no cargo; pass --bin (a packed folder has bin/example/profile_step)" >&2; exit 2; }
  LK_REQUIRE_NVCC=1 cargo build --release --example profile_step || exit 1
  bin=$(bash scripts/target-dir.sh)/release/examples/profile_step
fi
source "$here/gpu-env.sh" > "$results/cublas.txt"; cat "$results/cublas.txt"
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "gpu-profile: Nsight Compute (ncu) not found: install it (it ships with the CUDA toolkit) or put it on PATH" >&2; exit 1; }
"$ncu" --set full --clock-control none --export "$results/profile_step" --force-overwrite "$bin" 2>&1 | tee "$results/ncu.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-profile: ncu failed (ncu.log)" >&2; exit 1; }
"$ncu" --import "$results/profile_step.ncu-rep" --page details > "$results/ncu-details.txt" 2>&1
"$ncu" --import "$results/profile_step.ncu-rep" --page raw --csv \
  --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum \
  > "$results/ncu-summary.csv" 2>&1
echo "ncu done: $results: ncu-summary.csv (one row per kernel), ncu-details.txt, profile_step.ncu-rep"
