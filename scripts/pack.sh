#!/usr/bin/env bash
# Builds everything the GPU check runs into one self-contained folder, for a GPU host without Rust:
# the release test binaries, the criterion bench, the examples (perf_table, profile_step, finetune),
# the CLI, the test fixtures and the runner (gpu-check.sh). That host needs only the NVIDIA driver (and
# cuBLAS, compute-sanitizer and Nsight Compute for those steps: see README, "On a GPU").
#
#   LK_CUDA_ARCHS=90 bash scripts/pack.sh --out DIR [--archive]
#       (default DIR: ./gpu-pack; LK_CUDA_ARCHS default 80,86,89,90)
#   then, on the GPU host: bash DIR/gpu-check.sh --out RESULTS
#
# --archive also writes DIR.tar.xz, one file to copy: every binary embeds the same kernels, and xz with
# a dictionary that spans several binaries stores them about once (see README, "A GPU host without
# Rust", for sizes). Unpack with `tar xJf DIR.tar.xz`, or `python3 -m tarfile -e DIR.tar.xz .` where
# xz is missing.
#
# Layout: gpu-check.sh gpu-profile.sh gpu-env.sh pack-info.txt, bin/test/<name>, bin/bench/<name>,
# bin/example/<name>, bin/lora-kernels, tests/fixtures/. The runner cds into the folder and sets
# LK_FIXTURES and LK_CLI_BIN, so the test binaries find the fixtures and the CLI there.
set -euo pipefail
pack=./gpu-pack archive=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) pack=${2:?--out needs a directory}; shift 2 ;;
    --out=*) pack=${1#--out=}; shift ;;
    --archive) archive=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "pack: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$archive" = 0 ] || command -v xz >/dev/null || { echo "pack: --archive needs xz (xz-utils)" >&2; exit 2; }
mkdir -p "$pack"; pack=$(cd "$pack" && pwd)
cd "$(dirname "$0")/.."
case $pack/ in "$PWD"/src/*|"$PWD"/tests/*|"$PWD"/scripts/*) echo "pack: --out inside the sources" >&2; exit 2 ;; esac

# the kernels must be compiled by nvcc: a pack without them would only run the emulator
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
  NVCC=$(bash scripts/install-cuda-toolchain.sh | tail -n 1); export NVCC
fi
export LK_REQUIRE_NVCC=1
echo "pack: building (release, LK_CUDA_ARCHS=${LK_CUDA_ARCHS:-80,86,89,90})"
source scripts/cargo-artifacts.sh
artifacts=$(lk_cargo_artifacts)

rm -rf "$pack/bin" "$pack/tests"
mkdir -p "$pack/bin/test" "$pack/bin/bench" "$pack/bin/example" "$pack/tests"
while read -r kind name exe; do
  case $kind in
    cli) dest=$pack/bin/$name ;;
    *) dest=$pack/bin/$kind/$name ;;
  esac
  cp "$exe" "$dest"
  strip "$dest" 2>/dev/null || true
done <<< "$artifacts"
cp -r tests/fixtures "$pack/tests/fixtures"
runner=(gpu-check.sh gpu-profile.sh gpu-env.sh)
cp "${runner[@]/#/scripts/}" "$pack/"
chmod +x "$pack"/*.sh
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit (with uncommitted changes)"
nvcc_bin=${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-$CUDA_PATH}/bin/nvcc")}
{
  echo "commit: $commit"
  echo "packed: $(date -u +%F)"
  echo "archs: ${LK_CUDA_ARCHS:-80,86,89,90}"
  echo "nvcc: $("$nvcc_bin" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo unknown)"
  echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
  echo "binaries: $(echo "$artifacts" | wc -l)"
} > "$pack/pack-info.txt"
cat "$pack/pack-info.txt"
du -sh "$pack"
if [ "$archive" = 1 ]; then
  # one xz stream (-T1) whose dictionary reaches back over a few binaries, so each copy of the kernels
  # matches the previous one (compressing takes about 11 times the dictionary in memory, unpacking 1 time)
  # only what this script put there (not results or reports someone left in the folder)
  name=$(basename "$pack")
  files=(bin tests pack-info.txt "${runner[@]}")
  dict=$(find "$pack/bin" -type f -printf '%s\n' | sort -n | tail -n 1 \
    | awk '{d = 64; while (d * 1048576 < 4 * $1 && d < 1024) d *= 2; print d}')
  tar -C "$(dirname "$pack")" -cf - "${files[@]/#/$name/}" | xz -T1 --lzma2=preset=6,dict=${dict}MiB > "$pack.tar.xz.part"
  mv "$pack.tar.xz.part" "$pack.tar.xz"
  echo "archive: $pack.tar.xz ($(du -h "$pack.tar.xz" | cut -f1); unpack: tar xJf $(basename "$pack").tar.xz)"
fi
