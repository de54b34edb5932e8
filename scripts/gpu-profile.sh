#!/usr/bin/env bash
# On the GPU machine, after ../shared/gpu/pack.sh (which builds examples/profile_step.rs into .gpu/bin):
#   bash scripts/gpu-profile.sh        (with .gpu carried; results in $OUT)
# Nsight Compute over one call of each of our kernels on the headline layer and the cuBLAS GEMMs they
# are compared with: ncu.log (the one-line summary per kernel), ncu-details.txt (every section, text),
# profile_step.ncu-rep (open with ncu-ui). For when a kernel misses its target: docs/perf says why.
set -u
out=${OUT:-$PWD/gpu-out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh > "$out/cublas.txt"; cat "$out/cublas.txt"
command -v ncu >/dev/null || { echo "no ncu on this machine"; exit 1; }
ncu --set full --export "$out/profile_step" --force-overwrite .gpu/bin/example-profile_step 2>&1 | tee "$out/ncu.log"
ncu --import "$out/profile_step.ncu-rep" --page details > "$out/ncu-details.txt" 2>&1
ncu --import "$out/profile_step.ncu-rep" --page raw --csv \
  --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
  > "$out/ncu-summary.csv" 2>&1
echo "ncu done: ncu-summary.csv (one row per kernel), ncu-details.txt, profile_step.ncu-rep"
