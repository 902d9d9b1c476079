#!/usr/bin/env bash
# `make gpu-check`: the sidecar on a GPU, measured as users see it, beside llama.cpp's CUDA
# llama-server on the same GGUF, in one command on a lent GPU machine (no Rust, no network there).
# Reads what scripts/gpu-stage.sh packed into .gpu/ (carried there by the calls it prints).
#
#   scripts/gpu-check.sh              the whole check (about 3-7 minutes on 16 cores + an H100)
#   scripts/gpu-check.sh --prebuild   check the llama.cpp source, start its build detached, return
#   scripts/gpu-check.sh --status     which staged parts are here, how far the build is
#
# The check: reassembles .gpu/, finds the CUDA libraries (the Python venv's nvidia/cu13/lib, the
# driver's libcuda), starts the sidecar with --device cuda and checks it really computes there
# (start-up log, /metrics, nvidia-smi's memory of the process), prints a chat completion and a
# streamed one, builds llama-server with CUDA (in the background from the start, unless
# --prebuild already did), runs scripts/http-load.py against both servers (1, 4 and 16 streams;
# a long prompt for prefill) and prints them side by side with the goals: single-stream decode >=
# 1.0x llama.cpp CUDA, 16-stream aggregate >= 8x the sidecar's single stream. Everything lands in
# $OUT (default ./gpu-out). Each step that cannot run says so in one line starting "gpu-check:
# FAILED". A dry run on a machine without a GPU: SLUICE_GPU_CHECK_DEVICE=cpu (CPU sidecar,
# llama.cpp built without CUDA).
#
# Knobs (environment): SLUICE_GPU_CHECK_DEVICE (cuda), _BUDGET_S (wall-clock budget, 480),
# _STREAMS (1,4,16), _MAX_TOKENS (200), _REPEAT (3), _PROMPT_WORDS (40), _LONG_WORDS (1000),
# _MEASURE_S (one server's measurement at most, 90), _JOBS (nproc), _CUDA_ARCH (90),
# _LLAMA_FA (ON; OFF builds llama.cpp's CUDA kernels without FlashAttention, about half the
# build time, and measures it so), _SIDECAR_ARGS (extra serve flags, e.g. "--dtype bf16"),
# _SIDECAR / _MODEL / _LLAMA_SERVER (use these files instead of the staged ones),
# SLUICE_CUDA_LIB_DIRS (extra library folders, colon-separated).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mode="${1:-check}"
STAGE="$ROOT/.gpu"
OUT="${OUT:-$ROOT/gpu-out}"
DEVICE="${SLUICE_GPU_CHECK_DEVICE:-cuda}"
BUDGET_S="${SLUICE_GPU_CHECK_BUDGET_S:-480}"
STREAMS="${SLUICE_GPU_CHECK_STREAMS:-1,4,16}"
MAX_TOKENS="${SLUICE_GPU_CHECK_MAX_TOKENS:-200}"
REPEAT="${SLUICE_GPU_CHECK_REPEAT:-3}"
PROMPT_WORDS="${SLUICE_GPU_CHECK_PROMPT_WORDS:-40}"
LONG_WORDS="${SLUICE_GPU_CHECK_LONG_WORDS:-1000}"
JOBS="${SLUICE_GPU_CHECK_JOBS:-$(nproc)}"
CUDA_ARCH="${SLUICE_GPU_CHECK_CUDA_ARCH:-90}"
API_PORT="${SLUICE_GPU_CHECK_PORT:-18080}"
ADMIN_PORT=$((API_PORT + 1))
LLAMA_PORT=$((API_PORT + 2))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gpu=0
[[ "$DEVICE" == cuda* ]] && gpu=1
kind=$([[ $gpu == 1 ]] && echo cuda || echo cpu)
LLAMA_DIR="$STAGE/llama"
BUILD="$LLAMA_DIR/build-$kind"

mkdir -p "$OUT"
case "$mode" in
  check)
    exec > >(tee "$OUT/gpu-check.log") 2>&1
    tee_pid=$!
    ;;
  --prebuild | --status) ;;
  *) echo "usage: $0 [--prebuild|--status]" >&2; exit 2 ;;
esac

START=$SECONDS
say() { echo "gpu-check [$((SECONDS - START))s]: $*"; }
prefix() { sed "s/^/  $1: /"; } # indents stdin, each line labelled
fail() { echo "gpu-check: FAILED: $*"; exit 1; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# --- Processes this script started, stopped at exit.
sidecar_pid="" llama_pid="" build_pgid="" tee_pid="${tee_pid:-}"
stop() {
  local pid=$1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$sidecar_pid"
  stop "$llama_pid"
  if [[ -n "$build_pgid" ]] && kill -0 "$build_pgid" 2>/dev/null; then
    kill -TERM -- "-$build_pgid" 2>/dev/null || true
  fi
  if [[ "$mode" == check ]]; then
    [[ -f "$BUILD.log" ]] && tail -n 300 "$BUILD.log" >"$OUT/llama-build.log" 2>/dev/null
    for f in sidecar.log llama-server.log; do
      [[ -f "$OUT/$f" ]] && (($(stat -c %s "$OUT/$f") > 4 << 20)) &&
        tail -c $((4 << 20)) "$OUT/$f" >"$OUT/$f.tmp" && mv "$OUT/$f.tmp" "$OUT/$f"
    done
    # Let tee write the last lines before the command returns.
    exec >&- 2>&-
    [[ -n "$tee_pid" ]] && for _ in $(seq 50); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

http_get() { # URL [timeout]: prints the body; fails on a non-2xx status or no answer
  python3 - "$1" "${2:-5}" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.stdout.write(r.read().decode(errors="replace"))
except Exception as e:
    sys.exit(1)
PY
}

# --- Staged pieces: .gpu/manifest lists each with its sha256.
manifest_get() { sed -n "s/^$1=//p" "$STAGE/manifest" | head -n1; }
verify() { # NAME...: every named piece present and intact (all pieces without arguments)
  [[ -f "$STAGE/manifest" ]] ||
    fail "no .gpu/manifest: run scripts/gpu-stage.sh where the sidecar was built and make the device calls it prints (each carries .gpu/manifest)"
  local missing=() bad=() want name sum
  while read -r _ sum name; do
    if (($# > 0)); then
      want=0
      for n in "$@"; do [[ "$n" == "$name" ]] && want=1; done
      ((want)) || continue
    fi
    if [[ ! -f "$STAGE/$name" ]]; then
      missing+=(".gpu/$name")
    elif [[ "$(sha256sum "$STAGE/$name" | cut -d' ' -f1)" != "$sum" ]]; then
      bad+=(".gpu/$name")
    fi
  done < <(grep '^sha256 ' "$STAGE/manifest")
  ((${#bad[@]} == 0)) || fail "corrupt (sha256 differs from .gpu/manifest): ${bad[*]}; stage again and carry them again"
  ((${#missing[@]} == 0)) ||
    fail "missing ${missing[*]}: not carried yet, or the machine went back between the calls; make the calls from gpu-stage.sh again, from call 1, back to back"
}

unpack_llama_src() { # once per llama.cpp version: a build made from it stays usable
  local version
  version=$(manifest_get llama_version)
  if [[ ! -d "$LLAMA_DIR/llama.cpp" || "$(cat "$LLAMA_DIR/.version" 2>/dev/null)" != "$version" ]]; then
    rm -rf "$LLAMA_DIR" && mkdir -p "$LLAMA_DIR"
    xz -dc "$STAGE/llama-src.tar.xz" | tar x -C "$LLAMA_DIR" ||
      fail "cannot unpack .gpu/llama-src.tar.xz"
    echo "$version" >"$LLAMA_DIR/.version"
  fi
}

find_nvcc() {
  local c
  for c in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [[ -n "$c" && -x "$c" ]] && { readlink -f "$c"; return 0; }
  done
  return 1
}

# The folder holding a library (first match): SLUICE_CUDA_LIB_DIRS, the Python venv's NVIDIA wheels
# (nvidia/*/lib, as torch's cu13 wheels install them), the CUDA toolkit, the driver's folders,
# then ldconfig's cache.
find_lib() {
  local dirs=() extra=() p d
  IFS=: read -r -a extra <<<"${SLUICE_CUDA_LIB_DIRS:-}"
  dirs+=("${extra[@]}")
  while read -r p; do dirs+=("$p"/*/lib "$p"/lib); done < <(
    python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null || true)
  dirs+=(/opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib /usr/local/cuda/lib64
    /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib
    /usr/lib/x86_64-linux-gnu /usr/lib64)
  for d in "${dirs[@]}"; do
    [[ -n "$d" && -d "$d" && -e "$d/$1" ]] && { echo "$d"; return 0; }
  done
  p=$(ldconfig -p 2>/dev/null | awk -v l="$1" '$1 == l {print $NF; exit}')
  [[ -n "$p" ]] && { dirname "$p"; return 0; }
  return 1
}

# The llama-server build, detached in its own session (setsid) so a --prebuild call can leave it
# running for the next calls; state in $BUILD.{pid,log,rc}. Sets build_pgid when it starts one
# (stopped at exit, except after --prebuild).
start_llama_build() {
  if [[ -n "${SLUICE_GPU_CHECK_LLAMA_SERVER:-}" ]]; then return 0; fi
  if [[ -x "$BUILD/bin/llama-server" && "$(cat "$BUILD.rc" 2>/dev/null)" == 0 ]]; then
    say "llama-server already built ($BUILD)"; return 0
  fi
  local pid
  pid=$(cat "$BUILD.pid" 2>/dev/null || true)
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    # Started by an earlier call (--prebuild): left running at exit, for a rerun to use.
    say "llama-server build already running (pid $pid)"; return 0
  fi
  command -v cmake >/dev/null || { echo "gpu-check: FAILED: llama.cpp build: no cmake on PATH" | tee "$BUILD.log"; echo 1 >"$BUILD.rc"; return 0; }
  local gen=() cuda=() link_path=""
  command -v ninja >/dev/null && gen=(-G Ninja)
  if ((gpu)); then
    local nvcc
    nvcc=$(find_nvcc) || { echo "gpu-check: FAILED: llama.cpp build: no nvcc found" | tee "$BUILD.log"; echo 1 >"$BUILD.rc"; return 0; }
    local toolkit
    toolkit=$(dirname "$(dirname "$nvcc")")
    cuda=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" "-DCMAKE_CUDA_COMPILER=$nvcc"
      "-DCUDAToolkit_ROOT=$toolkit" -DGGML_CUDA_NCCL=OFF
      "-DGGML_CUDA_FA=${SLUICE_GPU_CHECK_LLAMA_FA:-ON}")
    if [[ ! -e "$toolkit/lib64/libcudart.so" && ! -e "$toolkit/lib/libcudart.so" && -d "$toolkit/lib" ]]; then
      # NVIDIA's wheels (nvidia/cu13): lib/ not lib64/, no unversioned names, no driver stub.
      # Link names for CMake and nvcc's own link step, pointing at the versioned libraries.
      local shim="$LLAMA_DIR/cuda-shim" l f cudadir
      mkdir -p "$shim"
      for l in cudart cublas cublasLt; do
        f=$(find "$toolkit/lib" -maxdepth 1 -name "lib$l.so.[0-9]*" ! -name '*alt*' | sort | head -n1)
        [[ -n "$f" ]] && ln -sfn "$f" "$shim/lib$l.so"
      done
      cudadir=$(find_lib libcuda.so.1 || true)
      [[ -n "$cudadir" ]] && ln -sfn "$cudadir/libcuda.so.1" "$shim/libcuda.so"
      cuda+=("-DCMAKE_LIBRARY_PATH=$shim")
      link_path="$toolkit/lib:$shim"
    fi
  fi
  rm -f "$BUILD.rc"
  local cfg=(cmake -S "$LLAMA_DIR/llama.cpp" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF "${cuda[@]}")
  # GGML_NATIVE=OFF with x86-64-v3's extensions named (alone it turns them all off): the
  # sidecar's baseline. -march=native
  # turns AMX on where the CPU lists it, and a VM that does not grant AMX state kills
  # llama-server at start with SIGILL (seen on this workplace's CPU machine).
  local bld=(cmake --build "$BUILD" --target llama-server -j "$JOBS")
  mkdir -p "$(dirname "$BUILD")"
  {
    echo 'set -o pipefail'
    # shellcheck disable=SC2016 # expanded by the build script
    [[ -n "$link_path" ]] && printf 'export LIBRARY_PATH=%q${LIBRARY_PATH:+:$LIBRARY_PATH}\n' "$link_path"
    printf '%q ' "${cfg[@]}"
    echo '&&'
    printf '%q ' "${bld[@]}"
    echo
    printf 'echo $? >%q\n' "$BUILD.rc"
  } >"$BUILD.sh"
  # nice 19: the sidecar's measurements, if they overlap the build, keep the CPU first.
  setsid nice -n 19 bash "$BUILD.sh" >"$BUILD.log" 2>&1 </dev/null &
  build_pgid=$!
  echo "$build_pgid" >"$BUILD.pid"
  say "llama-server build started ($kind, -j$JOBS, pid $build_pgid, log $BUILD.log)"
}
build_state() { # prints done|failed|running|none
  local rc pid
  rc=$(cat "$BUILD.rc" 2>/dev/null || true)
  if [[ "$rc" == 0 && -x "$BUILD/bin/llama-server" ]]; then echo "done"; return; fi
  [[ -n "$rc" ]] && { echo failed; return; }
  pid=$(cat "$BUILD.pid" 2>/dev/null || true)
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && { echo running; return; }
  echo none
}
build_progress() { grep -ao '\[[0-9]*/[0-9]*\]' "$BUILD.log" 2>/dev/null | tail -n1 || true; }

smi() { timeout -k 5 30 nvidia-smi "$@"; } # a wedged GPU must not hang the check
gpu_line() {
  if command -v nvidia-smi >/dev/null; then
    smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n1
  else
    echo "(no nvidia-smi)"
  fi
}

if [[ "$mode" == --prebuild ]]; then
  verify llama-src.tar.xz
  say "GPU: $(gpu_line); nvcc: $( (find_nvcc && "$(find_nvcc)" --version | tail -n1) | tr '\n' ' ' || echo none)"
  unpack_llama_src
  start_llama_build
  build_pgid="" # leave it running for the next calls
  say "started; the next calls carry the other parts"
  exit 0
fi
if [[ "$mode" == --status ]]; then
  if (verify); then say "all staged parts present and intact"; fi
  say "llama-server build ($kind): $(build_state) $(build_progress)"
  exit 0
fi

# ============================== the check ==============================
say "$(date -u +%FT%TZ) on $(hostname), $(nproc) cores, device=$DEVICE, budget ${BUDGET_S}s"
say "GPU: $(gpu_line)"
if ((gpu)) && ! command -v nvidia-smi >/dev/null; then fail "no nvidia-smi: is this the GPU machine?"; fi

# --- 1. The staged files.
sidecar="${SLUICE_GPU_CHECK_SIDECAR:-}"
model="${SLUICE_GPU_CHECK_MODEL:-}"
if [[ -z "$sidecar" || -z "$model" ]]; then
  verify
  run="$STAGE/run"
  want=$(manifest_get payload_sha256)
  if [[ "$(cat "$run/.payload" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$run" && mkdir -p "$run"
    mapfile -t parts < <(awk -v d="$STAGE" '$1 == "sha256" && $3 ~ /^part-/ {print d "/" $3}' "$STAGE/manifest")
    cat "${parts[@]}" | xz -dc | tar x -C "$run" || fail "cannot unpack .gpu/part-*"
    echo "$want" >"$run/.payload"
  fi
  sidecar="${sidecar:-$run/sluice-sidecar}" model="${model:-$run/model.gguf}"
  say "staged: $(grep '^# ' "$STAGE/manifest" | cut -c3-); sidecar from $(manifest_get sidecar_from) built $(manifest_get sidecar_built)"
fi
[[ -x "$sidecar" ]] || fail "no sidecar binary at $sidecar"
[[ -s "$model" ]] || fail "no model at $model"

# --- 2. llama.cpp's build, in the background from here on (unless --prebuild started it).
llama_server="${SLUICE_GPU_CHECK_LLAMA_SERVER:-}"
if [[ -z "$llama_server" ]]; then
  if [[ -f "$STAGE/llama-src.tar.xz" ]]; then
    verify llama-src.tar.xz
    unpack_llama_src
    start_llama_build
  else
    echo "gpu-check: FAILED: llama.cpp: no .gpu/llama-src.tar.xz (carried by call 1); going on without llama.cpp"
  fi
fi

# --- 3. The CUDA libraries the sidecar loads: cuBLAS, cuRAND, NVRTC (and the runtime); the
# driver's libcuda.
if ((gpu)); then
  libpath=()
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 \
    libnvrtc.so.13; do
    found=$(find_lib "$lib" || true)
    if [[ -z "$found" ]]; then
      [[ "$lib" == libcuda.so.1 ]] && fail "no libcuda.so.1 (the NVIDIA driver's library) on this machine"
      say "warning: $lib not found (searched the Python venv's nvidia/*/lib, /usr/local/cuda)"
      continue
    fi
    say "$lib: $found"
    [[ " ${libpath[*]} " == *" $found "* ]] || libpath+=("$found")
  done
  LD_LIBRARY_PATH="$(IFS=:; echo "${libpath[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  unresolved=$(ldd "$sidecar" 2>&1 | grep 'not found' | tr '\n' ' ' || true)
  [[ -z "$unresolved" ]] || fail "the sidecar cannot load: $unresolved"
fi

# --- 4. The sidecar on the device.
help=$("$sidecar" serve --help 2>&1) || fail "the sidecar binary does not run: $(echo "$help" | tail -n3 | tr '\n' ' ')"
args=(serve --model "$model" --served-name smollm2 --listen "127.0.0.1:$API_PORT"
  --admin-listen "127.0.0.1:$ADMIN_PORT" --allow-unlimited --max-seqs 16)
if grep -q -- '--device' <<<"$help"; then
  args+=(--device "$DEVICE")
elif ((gpu)); then
  fail "this sidecar has no --device flag (built before GPU support?)"
else
  say "note: this sidecar has no --device flag; it runs on the CPU"
fi
read -r -a extra_args <<<"${SLUICE_GPU_CHECK_SIDECAR_ARGS:-}"
args+=("${extra_args[@]}")
mem_before=""
((gpu)) && mem_before=$(smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 || true)
say "starting: sluice-sidecar ${args[*]}"
t_start=$SECONDS
"$sidecar" "${args[@]}" >"$OUT/sidecar.log" 2>&1 &
sidecar_pid=$!
ready=0
while ((SECONDS - t_start < 240)); do
  if http_get "http://127.0.0.1:$ADMIN_PORT/readyz" 2 >/dev/null; then ready=1; break; fi
  kill -0 "$sidecar_pid" 2>/dev/null || break
  sleep 0.3
done
if ((!ready)); then
  tail -n 15 "$OUT/sidecar.log" | prefix sidecar.log
  if kill -0 "$sidecar_pid" 2>/dev/null; then fail "the sidecar was not ready within 240 s"; fi
  fail "the sidecar exited at start-up (log above, $OUT/sidecar.log)"
fi
say "sidecar ready in $((SECONDS - t_start)) s"

# Is it really on the GPU? The start-up log, /metrics and nvidia-smi.
evidence=$(grep -aiE 'cuda|device|gpu|dtype' "$OUT/sidecar.log" | grep -aivE 'paged ?attention' | head -n 8 || true)
prefix log <<<"${evidence:-(no line of the start-up log names a device)}"
metrics=$(http_get "http://127.0.0.1:$ADMIN_PORT/metrics" 5 || true)
printf '%s\n' "$metrics" >"$OUT/metrics.txt"
mdev=$(grep -aiE 'cuda|device|gpu' <<<"$metrics" | grep -v '^# ' | head -n 6 || true)
prefix metrics <<<"${mdev:-(no cuda/device/gpu series in /metrics)}"
if ((gpu)); then
  apps=$(smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1 || true)
  mem_after=$(smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 || true)
  prefix nvidia-smi <<<"${apps:-(no compute processes listed)}"
  say "GPU memory used: ${mem_before} MiB before the sidecar, ${mem_after} MiB with it"
  named=0 held=0
  grep -qi cuda <<<"$evidence$mdev" && named=1
  grep -q "^$sidecar_pid," <<<"$apps" && held=1
  [[ "$mem_before" =~ ^[0-9]+$ && "$mem_after" =~ ^[0-9]+$ ]] && ((mem_after - mem_before > 64)) && held=1
  if ((!named && !held)); then
    fail "the sidecar does not run on the GPU: neither its log nor /metrics name CUDA, and it holds no GPU memory"
  fi
  ((named)) || say "warning: neither the log nor /metrics name CUDA, but the process holds GPU memory"
  ((held)) || say "warning: the log or /metrics name CUDA, but nvidia-smi shows no GPU memory for it"
  say "the sidecar runs on the GPU"
fi

# --- 5. One chat completion and one streamed.
timeout -k 5 120 python3 scripts/http-load.py --url "http://127.0.0.1:$API_PORT" --smoke \
  --max-tokens 48 || fail "the sidecar's chat completions (above)"

# --- 6. Measurements. Prompts are the same for both servers (same indices); the sidecar's
# measurement waits for the llama.cpp build first where the budget allows, so they do not share
# the CPU.
load() { # LABEL URL JSON SECONDS [INDEX_BASE]
  timeout -k 5 "$4" python3 scripts/http-load.py --label "$1" --url "$2" --json "$3" \
    --streams "$STREAMS" --prompt-words "$PROMPT_WORDS" --max-tokens "$MAX_TOKENS" \
    --repeat "$REPEAT" --long-prompt-words "$LONG_WORDS" --index-base "${5:-0}"
}
MEASURE_S="${SLUICE_GPU_CHECK_MEASURE_S:-90}" # one server's measurement, at most
wait_build() { # until the build is over or only SECONDS of the budget are left
  local keep=$1 last=""
  while [[ "$(build_state)" == running ]] && (($(left) > keep)); do
    local p
    p=$(build_progress)
    [[ "$p" != "$last" ]] && { say "waiting for the llama-server build $p"; last=$p; }
    sleep 5
  done
}
[[ -z "$llama_server" ]] && wait_build $((2 * MEASURE_S + 40))
overlap=""
[[ -z "$llama_server" && "$(build_state)" == running ]] &&
  overlap=" (llama.cpp build still running at nice 19: figures may be low)"
say "measuring the sidecar$overlap"
label="sluice-sidecar ($DEVICE)"
if ! load "$label" "http://127.0.0.1:$API_PORT" "$OUT/sidecar.json" "$MEASURE_S"; then
  [[ -s "$OUT/sidecar.json" ]] || fail "the sidecar's measurement (above)"
  say "warning: the sidecar's measurement was cut short (${MEASURE_S}s or an error): its levels so far"
  python3 scripts/http-load.py --table "$OUT/sidecar.json" || true
fi
http_get "http://127.0.0.1:$ADMIN_PORT/metrics" 5 >"$OUT/metrics.txt" || true
if ((gpu)); then
  smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader |
    prefix 'nvidia-smi after the load' || true
fi
stop "$sidecar_pid"
sidecar_pid=""

# --- 7. llama.cpp's llama-server on the same file.
llama_ok=0
llama_fail() { echo "gpu-check: FAILED: llama.cpp: $*"; }
if [[ -z "$llama_server" ]]; then
  wait_build $((MEASURE_S + 20))
  case "$(build_state)" in
    done) llama_server="$BUILD/bin/llama-server" ;;
    running) llama_fail "the build did not finish within the budget ($(build_progress)); raise SLUICE_GPU_CHECK_BUDGET_S or make the --prebuild call first" ;;
    *) tail -n 20 "$BUILD.log" 2>/dev/null | prefix llama-build.log
      llama_fail "the build failed (log above, $OUT/llama-build.log)" ;;
  esac
fi
if [[ -n "$llama_server" ]]; then
  if ((gpu)); then
    # llama-server links the CUDA runtime and cuBLAS dynamically: the toolkit's own come first.
    nvcc=$(find_nvcc || true)
    if [[ -n "$nvcc" ]]; then
      toolkit=$(dirname "$(dirname "$nvcc")")
      for d in "$toolkit/lib" "$toolkit/lib64"; do
        [[ -d "$d" ]] && LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
      done
      export LD_LIBRARY_PATH
    fi
  fi
  ngl=$((gpu ? 99 : 0))
  largs=(-m "$model" --host 127.0.0.1 --port "$LLAMA_PORT" -ngl "$ngl" -np 16 -c 65536 --no-webui)
  say "starting: llama-server ${largs[*]}"
  "$llama_server" "${largs[@]}" >"$OUT/llama-server.log" 2>&1 &
  llama_pid=$!
  ready=0
  t_start=$SECONDS
  while ((SECONDS - t_start < 120)); do
    if http_get "http://127.0.0.1:$LLAMA_PORT/health" 2 >/dev/null; then ready=1; break; fi
    kill -0 "$llama_pid" 2>/dev/null || break
    sleep 0.3
  done
  if ((!ready)); then
    tail -n 15 "$OUT/llama-server.log" | prefix llama-server.log
    llama_fail "llama-server did not become ready (log above)"
  else
    say "llama-server ready in $((SECONDS - t_start)) s: $(grep -aiE 'CUDA0|offloaded|build:' "$OUT/llama-server.log" | head -n 3 | tr '\n' ' ')"
    if load "llama.cpp llama-server ($kind)" "http://127.0.0.1:$LLAMA_PORT" "$OUT/llama.json" "$MEASURE_S"; then
      llama_ok=1
    elif [[ -s "$OUT/llama.json" ]]; then
      say "warning: llama-server's measurement was cut short (${MEASURE_S}s or an error): comparing the levels it has"
      llama_ok=1
    else
      llama_fail "its measurement failed (above)"
    fi
  fi
  stop "$llama_pid"
  llama_pid=""
fi

# --- 8. Side by side, and the goals.
echo
if ((llama_ok)); then
  python3 scripts/http-load.py --compare "$OUT/sidecar.json" "$OUT/llama.json" --goals || true
else
  echo "llama.cpp not measured: the sidecar's figures alone (the goals need llama.cpp's)."
  python3 - "$OUT/sidecar.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lv = {l["streams"]: l for l in r["levels"]}
one, top = lv.get(1), lv[max(lv)]
if one and one["agg_tok_s"]:
    print(f"goal: {max(lv)}-stream aggregate >= 8.0x single stream: "
          f"{top['agg_tok_s'] / one['agg_tok_s']:.2f}x")
PY
fi
say "done in $((SECONDS - START)) s; results in $OUT"
((llama_ok)) || exit 4
