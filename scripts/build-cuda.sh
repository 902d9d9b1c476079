#!/usr/bin/env bash
# `make build-cuda`: the sidecar's CUDA build, on a machine without a GPU or a CUDA install.
#
# The CUDA toolkit comes from NVIDIA's wheels on PyPI (scripts/requirements-cuda.txt), installed
# once into $SLUICE_CUDA_CACHE (default ~/.cache/sluice/cuda/13.0); the kernels are compiled for
# the architectures in $SLUICE_CUDA_ARCHS (default "80 90"); the build goes to its own target
# directory ($SLUICE_CUDA_TARGET_DIR, default ~/.cache/sluice/target-cuda), so it never rebuilds
# the CPU build's engine. Prints the binary's path, then `LD_LIBRARY_PATH=...` for the CUDA
# libraries it loads at run time (cuBLAS, cuRAND, NVRTC; the driver's libcuda comes from the host).
#
#   scripts/build-cuda.sh               the release binary
#   scripts/build-cuda.sh CARGO-ARGS... any cargo command in the same environment and target
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SLUICE_CUDA_CACHE:-$HOME/.cache/sluice/cuda/13.0}"
TARGET_DIR="${SLUICE_CUDA_TARGET_DIR:-$HOME/.cache/sluice/target-cuda}"
export SLUICE_CUDA_ARCHS="${SLUICE_CUDA_ARCHS:-80 90}"

stamp="$CACHE/.installed-$(sha256sum "$ROOT/scripts/requirements-cuda.txt" "$ROOT/scripts/nvcc-archs.sh" | sha256sum | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
  echo "build-cuda: installing the CUDA toolkit from PyPI into $CACHE" >&2
  rm -rf "$CACHE" && mkdir -p "$CACHE"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check \
    -r "$ROOT/scripts/requirements-cuda.txt"
  cuda="$(echo "$CACHE"/venv/lib/python3*/site-packages/nvidia/cu13)"
  ln -sfn "$cuda" "$CACHE/toolkit"
  mv "$cuda/bin/nvcc" "$cuda/bin/nvcc-real"
  install -m 0755 "$ROOT/scripts/nvcc-archs.sh" "$cuda/bin/nvcc"
  # The engine's kernels call the CUDA runtime: link it statically (`-lcudart` finds this
  # archive first), so the binary starts, and says what is missing, on a machine without CUDA.
  mkdir -p "$CACHE/link"
  ln -sfn "$cuda/lib/libcudart_static.a" "$CACHE/link/libcudart.a"
  touch "$stamp"
fi
toolkit="$(readlink -f "$CACHE/toolkit")"

export CUDA_HOME="$toolkit" CUDA_PATH="$toolkit" CUDA_ROOT="$toolkit"
export NVCC="$toolkit/bin/nvcc" PATH="$toolkit/bin:$PATH"
export LIBRARY_PATH="$CACHE/link${LIBRARY_PATH:+:$LIBRARY_PATH}"
# The engine's build scripts read one architecture from here; nvcc-archs.sh widens it.
export CUDA_COMPUTE_CAP="${SLUICE_CUDA_ARCHS%% *}"
export CARGO_TARGET_DIR="$TARGET_DIR"
# The engine's build scripts compile their kernels one at a time unless told.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"

cd "$ROOT"
if [[ $# -gt 0 ]]; then
  # Another cargo command in this environment (`make test-cuda`: the device tests).
  exec "${CARGO:-cargo}" "$@"
fi
"${CARGO:-cargo}" build --release --locked -p sluice-sidecar --features cuda >&2
echo "$TARGET_DIR/release/sluice-sidecar"
echo "LD_LIBRARY_PATH=$toolkit/lib"
