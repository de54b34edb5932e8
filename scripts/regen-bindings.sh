#!/usr/bin/env bash
# Refreshes the committed src/params_bindings.rs from kernels/include/lora_params.h (needs libclang).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet || true  # the crate may not compile until the bindings are fresh
target_dir=$(bash scripts/target-dir.sh)  # honours CARGO_TARGET_DIR
out=$(ls -td "$target_dir"/debug/build/lora-kernels-*/out 2>/dev/null | head -n 1 || true)
[ -f "$out/params_bindgen.rs" ] || { echo "bindgen did not run (is libclang installed?)"; exit 1; }
cp "$out/params_bindgen.rs" src/params_bindings.rs
echo "updated src/params_bindings.rs"
