#!/usr/bin/env bash
# The extra GPU-machine steps for ../shared/gpu/pack.sh: copy to .gpu/extra.sh after packing
#   bash ../shared/gpu/pack.sh && cp scripts/gpu-extra.sh .gpu/extra.sh
# .gpu/run.sh runs it from the repository root after the tests and compute-sanitizer; results go to $OUT.
# SKIP_EXTRA=1 skips it, so that one device call can run tests + table and another tests + sanitizer
# (each well under the 600 s a call may take; see README, "GPU runs").
set -u
out=${OUT:-$PWD/gpu-out}; mkdir -p "$out"
# run.sh pipes each test binary through `tee | tail` without pipefail, so its final "failures: N" does
# not count failing tests: count them here from tests.log (one "test result" line per binary).
if [ -f "$out/tests.log" ]; then
  echo "tests: $(grep -c '^test result: ok' "$out/tests.log") binaries ok, $(grep -c '^test result: FAILED' "$out/tests.log") FAILED, $(grep -c 'panicked' "$out/tests.log") panics" | tee "$out/tests-summary.txt"
  grep -E '^test .* FAILED$|panicked at' "$out/tests.log" | head -40 | tee -a "$out/tests-summary.txt"
fi
[ "${SKIP_EXTRA:-0}" = 1 ] && { echo "extra skipped (SKIP_EXTRA=1)"; exit 0; }
source scripts/gpu-env.sh > "$out/cublas.txt"; cat "$out/cublas.txt"
echo "commit: $(cat .gpu/commit.txt 2>/dev/null || echo unknown)  date: $(date -u +%F)" | tee "$out/perf_table.md"
s=$(date +%s); .gpu/bin/example-perf_table 2>&1 | tee -a "$out/perf_table.md"; echo "perf_table took $(( $(date +%s) - s )) s"
.gpu/bin/example-finetune 2>&1 | tee "$out/finetune.txt"
for b in .gpu/bin/bench-lora-*; do
  [ -x "$b" ] && LK_BENCH_QUICK=1 "$b" --bench 2>&1 | tee "$out/criterion.txt"
done
