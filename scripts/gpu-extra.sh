#!/usr/bin/env bash
# The extra GPU-machine steps for ../shared/gpu/pack.sh: copy to .gpu/extra.sh after packing
#   bash ../shared/gpu/pack.sh && cp scripts/gpu-extra.sh .gpu/extra.sh
# .gpu/run.sh runs it from the repository root after the tests and compute-sanitizer; results go to $OUT.
set -u
out=${OUT:-$PWD/gpu-out}
echo "commit: $(cat .gpu/commit.txt 2>/dev/null || echo unknown)  date: $(date -u +%F)" | tee "$out/perf_table.md"
.gpu/bin/example-perf_table 2>&1 | tee -a "$out/perf_table.md"
.gpu/bin/example-finetune 2>&1 | tee "$out/finetune.txt"
for b in .gpu/bin/bench-lora-*; do
  [ -x "$b" ] && LK_BENCH_QUICK=1 "$b" --bench 2>&1 | tee "$out/criterion.txt"
done
