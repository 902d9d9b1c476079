#!/usr/bin/env bash
# make fuzz: runs every fuzz target (fuzz/fuzz_targets/) under libFuzzer for FUZZ_SECONDS each
# (default 60), then prints, per target, the executions, the crashes and the slowest input.
# Fails when a target crashed (a panic, a broken promise, an input over 1 s, over 2 GB) or when
# an input of its corpus takes over FUZZ_SLOW_MS (default 100) to replay.
#
# cargo fuzz is installed from crates.io into ~/.cache/sluice/tools on first use. It passes
# unstable flags to rustc (coverage instrumentation); RUSTC_BOOTSTRAP=1 lets this project's
# stable toolchain take them. No sanitizer: the fuzzed code is safe Rust, so AddressSanitizer
# would only slow it; what fuzzing finds here is panics, broken promises, hangs and blow-ups.
# The build is the dev profile (as `make test`: dependencies optimised, our crates with
# overflow checks and debug assertions on) in a target directory of its own, since the
# instrumentation changes every crate; a cold build takes about as long as `make test`'s.
#
# The corpus each run grows is kept in ~/.cache/sluice/fuzz/corpus/<target> (libFuzzer also
# reads the committed seeds in fuzz/corpus/<target>, and writes nothing there). A crashing input
# lands in ~/.cache/sluice/fuzz/artifacts/<target>/: once fixed, commit it under
# fuzz/regressions/<target>/, where every `make test` replays it (fuzz/tests/corpus.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
slow_ms="${FUZZ_SLOW_MS:-100}"
cache="$HOME/.cache/sluice"
tools="$cache/tools"
work="$cache/fuzz"
export PATH="$tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$cache/fuzz-target"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked --root "$tools"
fi

all_targets="$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^sluice-fuzz$')"
targets="${FUZZ_TARGETS:-$all_targets}"
flags=(--dev --sanitizer none --features libfuzzer)

cargo fuzz build "${flags[@]}"
bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/debug"

failed=0
report="$(printf '%-20s %14s %8s %12s\n' target executions crashes 'slowest ms')"
total=0
for t in $targets; do
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t" "$work/logs"
  log="$work/logs/$t.log"
  echo "== $t: ${seconds}s"
  crashes=0
  # -timeout=1: an input running over a second is a crash (a hang) of its own.
  if ! cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=1 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/$t/" </dev/null >"$log" 2>&1; then
    crashes=1
    failed=1
    echo "$t crashed; the input and the log:" >&2
    grep -E 'Test unit written|panicked|ERROR' "$log" | head -n 5 >&2 || true
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  execs="${execs:-0}"
  total=$((total + execs))
  # The slowest input of the corpus: libFuzzer times each file it is handed ("Executed F in N
  # ms"), one process per batch so the start-up is paid once.
  slowest="$(find "$work/corpus/$t" "fuzz/corpus/$t" -type f -print0 |
    xargs -0 -r -n 2000 "$bin_dir/$t" 2>&1 |
    sed -n 's/^Executed .* in \([0-9]*\) ms$/\1/p' | sort -n | tail -n 1)"
  slowest="${slowest:-0}"
  if [ "$slowest" -gt "$slow_ms" ]; then
    echo "$t: an input of its corpus takes ${slowest} ms (over ${slow_ms} ms)" >&2
    failed=1
  fi
  report+="$(printf '\n%-20s %14s %8s %12s' "$t" "$execs" "$crashes" "$slowest")"
done
echo "$report"
printf '%-20s %14s\n' total "$total"
exit "$failed"
