# Sourced by scripts/gpu-check.sh and scripts/pack.sh. lk_cargo_artifacts builds, in release, the test
# binaries (`cargo test --release --no-run`), the benches (`cargo bench --no-run`) and the examples, and
# prints one line per executable: "<kind> <name> <path>", kind one of test, bench, example, cli. Test
# binaries are named after their target (cli, merge, ...); the library's unit tests are "lib", the
# CLI's unit tests "bin-lora-kernels". Cargo's own output goes to stderr.
lk_cargo_artifacts() {
  local jobs=()
  [ -n "${LK_BUILD_JOBS:-}" ] && jobs=(-j "$LK_BUILD_JOBS")
  {
    cargo test --release --no-run "${jobs[@]}" --message-format=json-render-diagnostics || echo BUILD-FAILED
    cargo bench --no-run "${jobs[@]}" --message-format=json-render-diagnostics || echo BUILD-FAILED
    cargo build --release --examples "${jobs[@]}" --message-format=json-render-diagnostics || echo BUILD-FAILED
  } | sed -nE '/^BUILD-FAILED$/p; /^\{"reason":"compiler-artifact"/{ /"executable":"[^"]/p }' \
    | while IFS= read -r line; do
        [ "$line" = BUILD-FAILED ] && { echo BUILD-FAILED; continue; }
        kind=$(echo "$line" | sed -E 's/.*"target":\{"kind":\["([^"]*)".*/\1/')
        name=$(echo "$line" | sed -E 's/.*"target":\{[^}]*"name":"([^"]*)".*/\1/')
        exe=$(echo "$line" | sed -E 's/.*"executable":"([^"]*)".*/\1/')
        istest=$(echo "$line" | grep -q '"profile":{[^}]*"test":true' && echo 1 || echo 0)
        case $kind:$istest in
          lib:1) echo "test lib $exe" ;;
          bin:1) echo "test bin-$name $exe" ;;
          bin:0) echo "cli $name $exe" ;;
          test:*) echo "test $name $exe" ;;
          bench:*) echo "bench $name $exe" ;;
          example:*) echo "example $name $exe" ;;
        esac
      done | sort -u -k1,2 | { all=$(cat); echo "$all" | grep -v BUILD-FAILED; ! echo "$all" | grep -q BUILD-FAILED; }
}
