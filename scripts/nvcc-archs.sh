#!/usr/bin/env bash
# nvcc for `make build-cuda`: compiles each object for every architecture in $SLUICE_CUDA_ARCHS
# (default "80 90": A100, H100/H200) plus PTX of the newest for later GPUs, where the engine's
# build scripts (cudaforge) pass one `-gencode` for $CUDA_COMPUTE_CAP. PTX builds (`--ptx`, candle's
# kernels, JIT-compiled by the driver for the GPU at hand) keep their one architecture.
set -euo pipefail
# Installed as the toolkit's bin/nvcc by scripts/build-cuda.sh, beside the real one.
nvcc="$(dirname "$0")/nvcc-real"
args=() ptx=0
for a in "$@"; do [[ "$a" == --ptx ]] && ptx=1; done
for a in "$@"; do
  if [[ $ptx == 0 && "$a" == -gencode=* ]]; then
    last=""
    for cap in ${SLUICE_CUDA_ARCHS:-80 90}; do
      args+=("-gencode=arch=compute_$cap,code=sm_$cap"); last=$cap
    done
    args+=("-gencode=arch=compute_$last,code=compute_$last")
  else
    args+=("$a")
  fi
done
exec "$nvcc" "${args[@]}"
