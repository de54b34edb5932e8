#!/usr/bin/env bash
# Prints cargo's target directory for this crate, as `cargo metadata` reports it: $CARGO_TARGET_DIR,
# else build.target-dir from a .cargo/config.toml, else ./target. Scripts that read build outputs
# (OUT_DIR's ptxas reports, the generated bindings) find them through this instead of assuming ./target.
set -euo pipefail
cd "$(dirname "$0")/.."
meta=$(cargo metadata --format-version 1 --no-deps)
if command -v python3 >/dev/null; then
  printf '%s' "$meta" | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
else
  # no python: the field is a plain string (a path with a `"` in it is not supported here)
  printf '%s' "$meta" | grep -o '"target_directory":"[^"]*"' | sed 's/^"target_directory":"//; s/"$//; s/\\\\/\\/g'
fi
