#!/usr/bin/env bash
# The whole GPU check in one command, quickest results first: the tests with LK_REQUIRE_GPU=1, the
# finetune example, the perf table, the criterion benches, with --profile Nsight Compute
# (scripts/gpu-profile.sh), then compute-sanitizer memcheck and racecheck over the test binaries (the
# slowest step).
# Every result goes into --out DIR, and the record for docs/perf/ is rewritten there after each step, so
# an interrupted run keeps what it finished. It ends with the test summary and the perf table, and exits
# non-zero if anything failed.
#
#   bash scripts/gpu-check.sh --out DIR [options]      from the repository (builds with cargo --release)
#   bash <folder>/gpu-check.sh --out DIR [options]     inside a folder made by scripts/pack.sh (no cargo)
#
# Options:
#   --out DIR         where the results go (default: ./gpu-check-out)
#   --allow-no-gpu    a dry run on a machine without a GPU: GPU tests skip instead of failing, and the
#                     sanitizer and Nsight Compute steps are skipped; without it, no GPU is an error
#   --quick           perf table and benches on the headline cases and M = 256 (LK_BENCH_QUICK=1)
#   --gpu-only        the tests' GPU parts alone (LK_TEST_DEVICES=gpu), in the test and sanitizer steps:
#                     their emulator halves, which CI runs, take most of the time; needs a GPU
#   --tests A,B       only these test binaries (names as in tests/<binary>.log) in the test step and,
#                     unless --sanitize names others, in the sanitizer step
#   --sanitize A,B    only these test binaries under compute-sanitizer (each run is ~100x slower)
#   --skip-sanitizer  no compute-sanitizer step
#   --skip-bench      no criterion step
#   --skip-perf       no finetune example and no perf table (a correctness run: tests, sanitizer)
#   --profile         also run Nsight Compute over examples/profile_step.rs (scripts/gpu-profile.sh)
#   --time-limit S    the whole check in S seconds (a CI job's or a shared host's limit): each step gets
#                     at most what is left, a step that cannot start is recorded "not started", and the
#                     check ends with the record written and a failure saying so
#
# Time limits: LK_RUN_TIMEOUT seconds for one test binary, example, bench or ncu run (default 1800;
# one that hangs is stopped, with every process it started, and counted failed), LK_SANITIZER_TIMEOUT
# for one compute-sanitizer run (default 3600).
#
# Files in DIR: device.txt, tests/<binary>.log, tests-summary.txt, finetune.txt, perf_table.md,
# criterion.txt (+ criterion/), sanitizer/<tool>-<binary>.log, sanitizer-summary.txt, ncu/ (--profile),
# and <date>-<device>.md: the record for docs/perf/ (device, driver, date, commit, all of the above).
set -u
invocation="gpu-check.sh $*"

results=./gpu-check-out allow_no_gpu=0 quick=0 sanitize=1 bench=1 perf=1 profile=0 gpu_only=0 only= only_sanitize=
time_limit=
while [ $# -gt 0 ]; do
  case $1 in
    --out) results=${2:?--out needs a directory}; shift 2 ;;
    --out=*) results=${1#--out=}; shift ;;
    --allow-no-gpu) allow_no_gpu=1; shift ;;
    --quick) quick=1; shift ;;
    --gpu-only) gpu_only=1; shift ;;
    --tests) only=${2:?--tests needs a list of test binaries}; shift 2 ;;
    --tests=?*) only=${1#--tests=}; shift ;;
    --sanitize) only_sanitize=${2:?--sanitize needs a list of test binaries}; shift 2 ;;
    --sanitize=?*) only_sanitize=${1#--sanitize=}; shift ;;
    --skip-sanitizer) sanitize=0; shift ;;
    --skip-bench) bench=0; shift ;;
    --skip-perf) perf=0; shift ;;
    --profile) profile=1; shift ;;
    --time-limit) time_limit=${2:?--time-limit needs a number of seconds}; shift 2 ;;
    --time-limit=*) time_limit=${1#--time-limit=}; shift ;;
    -h|--help) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$results" && results=$(cd "$results" && pwd) || { echo "gpu-check: cannot create $results" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
case $here$results in *[[:space:]]*) echo "gpu-check: paths with spaces are not supported ($here, $results)" >&2; exit 2 ;; esac
[ "$quick" = 1 ] && export LK_BENCH_QUICK=1
# the longest one test binary, example, bench or sanitizer run may take (a kernel that hangs must not
# stall the check)
run_timeout=${LK_RUN_TIMEOUT:-1800} sanitizer_timeout=${LK_SANITIZER_TIMEOUT:-3600}
for v in "LK_RUN_TIMEOUT=$run_timeout" "LK_SANITIZER_TIMEOUT=$sanitizer_timeout" ${time_limit:+"--time-limit=$time_limit"}; do
  case ${v#*=} in '' | *[!0-9]* | 0) echo "gpu-check: ${v%%=*} must be a whole number of seconds, at least 1" >&2; exit 2 ;; esac
done
# --time-limit: the moment the check must have ended; each run stops 35 s before it at the latest (the 30 s
# timeout gives a run to exit after TERM, and the record's last writing)
deadline=
[ -n "$time_limit" ] && deadline=$(( $(date +%s) + time_limit ))
# time_for SECONDS: the time a run may take: SECONDS, or what --time-limit leaves if less; 0 if nothing
time_for() {
  local t=$1 left
  if [ -n "$deadline" ]; then
    left=$(( deadline - $(date +%s) - 35 ))
    [ "$left" -lt "$t" ] && t=$left
    [ "$t" -lt 1 ] && t=0
  fi
  echo "$t"
}
# run_limited SECONDS COMMAND...: COMMAND in a process group of its own (timeout's), stopped with all its
# children (a CLI the tests spawn, the binary under compute-sanitizer, the program under ncu) after
# SECONDS, or sooner if --time-limit leaves less (limit_used says how long, limit_asked the SECONDS asked
# for): exit 124, or 137 if it had to be killed; 125 without running it when --time-limit leaves no time. On INT or TERM the check stops
# that group too. why_stopped RC SETTING: the words for a run's 124/125/137 (empty for other codes).
# the check's own stderr: a trap runs inside run_limited, whose output goes to a step's log
exec {stderr_fd}>&2
child=
limit_used= limit_asked=
run_limited() {
  local secs rc
  secs=$(time_for "$1")
  limit_asked=$1 limit_used=$secs
  shift
  [ "$secs" = 0 ] && return 125
  timeout -k 30 "$secs" "$@" &
  child=$!
  wait "$child"; rc=$?
  child=
  return $rc
}
why_suffix() {  # why_suffix RC SETTING: ", <why_stopped>" or nothing
  local w
  w=$(why_stopped "$1" "$2")
  [ -z "$w" ] || echo ", $w"
}
why_stopped() {
  case $1 in
    125) echo "not started: --time-limit $time_limit s reached" ;;
    124 | 137)
      if [ "$limit_used" -lt "$limit_asked" ]; then
        echo "stopped after $limit_used s: --time-limit $time_limit s reached"
      else
        echo "stopped after $limit_used s ($2: a hang?)"
      fi ;;
  esac
}

# The card's state, read only: the query fields this driver takes (a driver that names the clock event
# reasons the old way is asked that way). Like device.txt, nvidia-smi's first GPU (on a host with several,
# it need not be CUDA's device 0).
state_fields() {
  local q=clocks.sm,clocks.mem,power.draw,temperature.gpu f
  for f in clocks_event_reasons.active clocks_throttle_reasons.active; do
    timeout 20 nvidia-smi --query-gpu=$q,$f --format=csv,noheader > /dev/null 2>&1 && { echo "$q,$f"; return; }
  done
  echo "$q"
}
# state_summary CSV: one line from the samples nvidia-smi took during a step
state_summary() {
  awk -F', ' 'NR > 1 && $2 + 0 > 0 {
      n++; sm = $2 + 0; p = $4 + 0; t = $5 + 0
      if (n == 1 || sm < lo) lo = sm; if (sm > hi) hi = sm; if (p > pw) pw = p; if (t > tmax) tmax = t
      if (NF >= 6 && $6 !~ /^0x0+$/) { held++; why[$6] = 1 }
    }
    END {
      if (n == 0) { print "no samples"; exit }
      r = ""; for (w in why) r = r " " w
      printf "%d samples, SM clock %d-%d MHz, power up to %.0f W, temperature up to %d C, clock event reasons other than none in %d samples%s\n", n, lo, hi, pw, tmax, held + 0, (r == "" ? "" : ":" r)
    }' "$1"
}

fail=0
failed() { echo "FAILED: $*" | tee -a "$results/failures.txt"; fail=1; }
: > "$results/failures.txt"

# --- where the binaries are: a packed folder (pack-info.txt beside this script) or the repository
if [ -f "$here/pack-info.txt" ]; then
  root=$here
  cd "$root"
  export LK_FIXTURES=$root/tests/fixtures LK_CLI_BIN=$root/bin/lora-kernels
  commit=$(sed -n 's/^commit: //p' pack-info.txt)
  echo "packed folder $root"; cat pack-info.txt
  tests=$(ls "$root"/bin/test/* 2>/dev/null)
  perf_table=$root/bin/example/perf_table finetune=$root/bin/example/finetune profile_step=$root/bin/example/profile_step
  benches=$(ls "$root"/bin/bench/* 2>/dev/null)
else
  root=$(cd "$here/.." && pwd)
  cd "$root"
  command -v cargo >/dev/null || { echo "gpu-check: no cargo here and no packed folder (pack-info.txt): build one with scripts/pack.sh" >&2; exit 2; }
  commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit (with uncommitted changes)"
  if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
    NVCC=$(bash scripts/install-cuda-toolchain.sh | tail -n 1) && export NVCC
  fi
  export LK_REQUIRE_NVCC=1
  echo "== build (cargo, release; LK_CUDA_ARCHS=${LK_CUDA_ARCHS:-default})"
  source scripts/cargo-artifacts.sh
  lk_cargo_artifacts > "$results/artifacts.txt" || { echo "gpu-check: the build failed" >&2; exit 1; }
  # the same layout as a packed folder, as links to cargo's executables
  rm -rf "$results/bin"; mkdir -p "$results/bin/test" "$results/bin/bench" "$results/bin/example"
  while read -r kind name exe; do
    [ "$kind" = cli ] || ln -s "$exe" "$results/bin/$kind/$name"
  done < "$results/artifacts.txt"
  tests=$(ls "$results"/bin/test/* 2>/dev/null)
  benches=$(ls "$results"/bin/bench/* 2>/dev/null)
  perf_table=$results/bin/example/perf_table finetune=$results/bin/example/finetune
  profile_step=$results/bin/example/profile_step
fi
[ -n "$tests" ] || { echo "gpu-check: no test binaries found" >&2; exit 2; }
# --tests / --sanitize: the named binaries, each checked against those found
all_tests=$tests
pick() {
  local name t found picked= names
  IFS=, read -ra names <<< "$1"
  for name in "${names[@]}"; do
    [ -n "$name" ] || continue
    found=
    for t in $all_tests; do [ "$(basename "$t")" = "$name" ] && found=$t; done
    [ -n "$found" ] || {
      echo "gpu-check: no test binary named '$name'; there are:" $(for t in $all_tests; do basename "$t"; done) >&2
      return 1
    }
    case " $picked " in *" $found "*) ;; *) picked="$picked $found" ;; esac
  done
  [ -n "$picked" ] || { echo "gpu-check: an empty list of test binaries" >&2; return 1; }
  echo $picked
}
if [ -n "$only" ]; then tests=$(pick "$only") || exit 2; fi
sanitize_tests=$tests
if [ -n "$only_sanitize" ]; then sanitize_tests=$(pick "$only_sanitize") || exit 2; fi
export CRITERION_HOME=$results/criterion
name_of() { basename "$1"; }

# --- the GPU
echo "== device"
gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L > "$results/device.txt" 2>&1 && grep -q '^GPU ' "$results/device.txt"; then
  gpu=1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv \
    > "$results/device.txt" 2>&1
  cat "$results/device.txt"
else
  why=$(command -v nvidia-smi >/dev/null && head -n 1 "$results/device.txt" || echo 'not installed')
  echo "no NVIDIA GPU found (nvidia-smi: $why)" | tee "$results/device.txt"
  if [ "$allow_no_gpu" != 1 ]; then
    echo "gpu-check: this is a GPU check and there is no GPU; --allow-no-gpu runs it without one (a dry run)" >&2
    exit 2
  fi
  [ "$gpu_only" = 1 ] && { echo "gpu-check: --gpu-only needs a GPU (without one it would check nothing)" >&2; exit 2; }
  echo "--allow-no-gpu: GPU tests skip, no sanitizer, no Nsight Compute"
fi
if [ "$gpu_only" = 1 ]; then export LK_TEST_DEVICES=gpu; echo "--gpu-only: the tests' GPU parts alone (LK_TEST_DEVICES=gpu)"; fi
source "$here/gpu-env.sh" > "$results/cublas.txt"; cat "$results/cublas.txt"
if [ "$gpu" = 1 ]; then export LK_REQUIRE_GPU=1; else unset LK_REQUIRE_GPU; fi

# --- the record for docs/perf/, rewritten after each step (an interrupted run keeps what it finished)
date=$(date -u +%F)
if [ "$gpu" = 1 ]; then
  device=$(sed -n 2p "$results/device.txt" | cut -d, -f1 | tr 'A-Z' 'a-z' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
else
  device=no-gpu
fi
record=$results/$date-$device.md
: > "$results/tests-summary.txt"
: > "$results/sanitizer-summary.txt"
rm -f "$results/perf_table.md"
step=starting
write_record() {  # write_record STATE: the whole record, replaced at once (a reader never sees half of it)
  local section
  case $1 in running:*) step=${1#running: } ;; esac
  {
    echo "# $device, $date"
    echo
    echo "- device (name, driver, memory, max SM clock, compute capability): $(if [ "$gpu" = 1 ]; then sed -n 2p "$results/device.txt"; else head -n 1 "$results/device.txt"; fi)"
    echo "- commit: $commit"
    echo "- date: $date; command: $invocation$([ "$gpu_only" = 1 ] && echo ' (--gpu-only: the GPU parts of the tests alone)')"
    echo "- state: $1"
    if [ -s "$results/failures.txt" ]; then echo "- failures:"; sed 's/^FAILED: /  - /' "$results/failures.txt"; fi
    echo
    for section in "Tests:tests-summary.txt" "compute-sanitizer:sanitizer-summary.txt"; do
      echo "## ${section%%:*}"; echo
      if [ -s "$results/${section#*:}" ]; then echo '```'; cat "$results/${section#*:}"; echo '```'; else echo "(not run)"; fi
      echo
    done
    echo "## Perf table"; echo
    if [ -s "$results/perf_table.md" ]; then sed '1,3d' "$results/perf_table.md"; else echo "(not run)"; fi
    echo
    echo "## Targets (docs/perf/README.md): mark each met or missed with the measured ratio"
  } > "$record.part" && mv -f "$record.part" "$record"
}
on_signal() {
  # ignored from here on: a second signal (timeout sends one to the process, one to its group) must not
  # cut the record short
  trap '' INT TERM
  [ -n "$child" ] && kill -TERM -- "-$child" 2>/dev/null
  echo "gpu-check: $1 during $step: stopped; the record keeps what finished" >&"$stderr_fd"
  write_record "interrupted ($1) during: $step"
  exit 130
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
write_record "running: tests"

# --- the tests: counted here, from each binary's "test result:" lines and its exit status
echo "== tests (LK_REQUIRE_GPU=${LK_REQUIRE_GPU:-unset})"
mkdir -p "$results/tests"
passed=0 nfailed=0 ignored=0 bad_bins=0
for t in $tests; do
  n=$(name_of "$t"); log=$results/tests/$n.log
  s=$(date +%s)
  run_limited "$run_timeout" "$t" --test-threads=1 > "$log" 2>&1; rc=$?
  p=$(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  f=$(sed -nE 's/^test result: .* ([0-9]+) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  i=$(sed -nE 's/^test result: .* ([0-9]+) ignored.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  passed=$((passed + p)) nfailed=$((nfailed + f)) ignored=$((ignored + i))
  if [ "$rc" != 0 ] || [ "$f" != 0 ] || ! grep -q '^test result: ' "$log"; then
    bad_bins=$((bad_bins + 1))
    line="$n: FAILED (exit $rc; $p passed, $f failed, $i ignored)"
    case $rc in
      124 | 125 | 137) line="$line: $(why_stopped $rc LK_RUN_TIMEOUT), see tests/$n.log" ;;
      *) [ "$rc" != 0 ] && [ "$f" = 0 ] && line="$line: crashed or exited non-zero, see tests/$n.log" ;;
    esac
  else
    line="$n: ok ($p passed, $i ignored)"
  fi
  line="$line, $(( $(date +%s) - s )) s"
  echo "$line" | tee -a "$results/tests-summary.txt"
  grep -E '^test .* \.\.\. FAILED$|^---- .* stdout ----$' "$log" | sed 's/^/    /' >> "$results/tests-summary.txt"
  write_record "running: tests"
done
# The sm_90a GEMMs are opt-in (LK_FUSED_GEMM=auto) until they have passed on a GPU: on sm_90, the LoRA
# op and layer tests once more with them.
if [ "$gpu" = 1 ] && nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | grep -q '^9\.0'; then
  for t in $tests; do
    n=$(name_of "$t")
    case "$n" in lora_ops | lora_linear | dora_layer | dora_linear) ;; *) continue ;; esac
    log=$results/tests/$n-sm90a.log
    LK_FUSED_GEMM=auto run_limited "$run_timeout" "$t" --test-threads=1 > "$log" 2>&1; rc=$?
    case $rc in
      0) r=ok ;;
      124 | 125 | 137) r="FAILED ($(why_stopped $rc LK_RUN_TIMEOUT))"; bad_bins=$((bad_bins + 1)) ;;
      *) r="FAILED (exit $rc)"; bad_bins=$((bad_bins + 1)) ;;
    esac
    echo "$n with LK_FUSED_GEMM=auto (the sm_90a GEMMs): $r, see tests/$n-sm90a.log" | tee -a "$results/tests-summary.txt"
  done
fi
total="tests: $passed passed, $nfailed failed, $ignored ignored; $bad_bins of $(echo "$tests" | wc -w) binaries failed"
[ "$gpu" = 0 ] && total="$total (no GPU: the GPU part of each test was skipped)"
echo "$total" | tee -a "$results/tests-summary.txt"
[ "$bad_bins" = 0 ] || failed "$bad_bins test binaries ($nfailed failing tests): $results/tests-summary.txt"

if [ "$perf" = 1 ]; then
  write_record "running: finetune example, perf table"
  # --- the finetune example, the perf table, the benches
  echo "== finetune example"
  run_limited "$run_timeout" "$finetune" > "$results/finetune.txt" 2>&1; rc=$?
  [ "$rc" = 0 ] || failed "finetune example (exit $rc$(why_suffix $rc LK_RUN_TIMEOUT); finetune.txt)"
  tail -n 12 "$results/finetune.txt"

  echo "== perf table"
  { echo "commit: $commit"; echo "date: $(date -u +%F)"; echo; } > "$results/perf_table.md"
  # the card's state every second while the table runs (read only: clocks, power, temperature, why
  # clocks were held), into gpu_state.csv and one line of the table's file
  sampler= sample_for=$(time_for "$run_timeout")
  if [ "$gpu" = 1 ] && [ "$sample_for" != 0 ]; then
    timeout "$sample_for" nvidia-smi --query-gpu=timestamp,"$(state_fields)" --format=csv -lms 1000 \
      > "$results/gpu_state.csv" 2>&1 &
    sampler=$!
  fi
  run_limited "$run_timeout" "$perf_table" >> "$results/perf_table.md" 2> "$results/perf_table.stderr"; rc=$?
  if [ -n "$sampler" ]; then
    kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
    printf '\nGPU state during the table (nvidia-smi every second, gpu_state.csv): %s\n' \
      "$(state_summary "$results/gpu_state.csv")" >> "$results/perf_table.md"
  fi
  [ "$rc" = 0 ] || failed "perf table (exit $rc$(why_suffix $rc LK_RUN_TIMEOUT); perf_table.stderr)"
  grep -q MISMATCH "$results/perf_table.md" \
    && failed "perf table: MISMATCH (a row where ours differs from cuBLAS, or the L2 probe's sums are wrong)"
  [ "$gpu" = 1 ] && grep -q 'perf_table skipped' "$results/perf_table.md" && failed "perf table skipped on a GPU machine"
else
  echo "== finetune example and perf table: skipped (--skip-perf)"
fi

if [ "$bench" = 1 ]; then
  write_record "running: benches"
  echo "== criterion benches"
  : > "$results/criterion.txt"
  for b in $benches; do
    run_limited "$run_timeout" "$b" --bench >> "$results/criterion.txt" 2>&1; rc=$?
    [ "$rc" = 0 ] || failed "bench $(name_of "$b") (exit $rc$(why_suffix $rc LK_RUN_TIMEOUT); criterion.txt)"
  done
  grep -E 'skipped|time:' "$results/criterion.txt" | head -n 40
else
  echo "== criterion benches: skipped (--skip-bench)"
fi

if [ "$profile" = 1 ]; then
  write_record "running: Nsight Compute"
  if [ "$gpu" = 0 ]; then
    echo "== Nsight Compute: skipped (no GPU, --allow-no-gpu)"
  else
    echo "== Nsight Compute"
    run_limited "$run_timeout" bash "$here/gpu-profile.sh" --out "$results/ncu" --bin "$profile_step"; rc=$?
    [ "$rc" = 0 ] || failed "Nsight Compute (exit $rc$(why_suffix $rc LK_RUN_TIMEOUT); ncu/)"
  fi
fi

# --- compute-sanitizer (last of the checks: the slowest)
find_tool() {
  command -v "$1" 2>/dev/null && return
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/$1" ] && { echo "$d/bin/$1"; return; }
  done
  for f in /usr/local/cuda/compute-sanitizer/"$1" /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda/nsight-compute*/"$1"; do
    [ -x "$f" ] && { echo "$f"; return; }
  done
  return 1
}
: > "$results/sanitizer-summary.txt"
if [ "$sanitize" = 0 ]; then
  echo "== compute-sanitizer: skipped (--skip-sanitizer)" | tee "$results/sanitizer-summary.txt"
elif [ "$gpu" = 0 ]; then
  echo "== compute-sanitizer: skipped (no GPU, --allow-no-gpu)" | tee "$results/sanitizer-summary.txt"
elif ! cs=$(find_tool compute-sanitizer); then
  echo "== compute-sanitizer: not found (it ships with the CUDA toolkit; put it on PATH or set CUDA_HOME)" \
    | tee "$results/sanitizer-summary.txt"
  failed "compute-sanitizer not found (--skip-sanitizer to leave it out)"
else
  echo "== compute-sanitizer ($cs)"
  write_record "running: compute-sanitizer"
  mkdir -p "$results/sanitizer"
  for tool in memcheck racecheck; do
    for t in $sanitize_tests; do
      n=$(name_of "$t"); log=$results/sanitizer/$tool-$n.log
      # LK_SANITIZE=1: the tests pick fewer property cases under the sanitizer
      LK_SANITIZE=1 run_limited "$sanitizer_timeout" "$cs" --tool "$tool" --error-exitcode 9 \
        "$t" --test-threads=1 > "$log" 2>&1; rc=$?
      errs=$(sed -nE 's/^========= ERROR SUMMARY: ([0-9]+) error.*/\1/p' "$log" | tail -n 1)
      if [ "$rc" = 0 ]; then
        echo "$tool $n: ok (${errs:-0} errors)" | tee -a "$results/sanitizer-summary.txt"
      else
        echo "$tool $n: FAILED (exit $rc, ${errs:-?} errors$(why_suffix $rc LK_SANITIZER_TIMEOUT); sanitizer/$tool-$n.log)" \
          | tee -a "$results/sanitizer-summary.txt"
        failed "$tool $n"
      fi
      write_record "running: compute-sanitizer"
    done
  done
fi

if [ "$fail" = 0 ]; then
  write_record "finished, every step passed"
else
  write_record "finished, FAILED (failures below)"
fi

echo
echo "== summary"
cat "$results/tests-summary.txt"
echo
cat "$results/perf_table.md" 2>/dev/null
echo
echo "results: $results (record for docs/perf/: $(basename "$record"))"
if [ "$fail" != 0 ]; then
  echo "GPU CHECK FAILED:"; cat "$results/failures.txt"
  exit 1
fi
if [ "$gpu" = 1 ]; then echo "GPU check passed"; else echo "dry run passed (no GPU: nothing ran on a GPU)"; fi
