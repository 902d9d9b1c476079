# syntax=docker/dockerfile:1
# sluice-sidecar image, NVIDIA CUDA build (the operator's `--sidecar-cuda-image`). Build from the
# repository root:
#   docker build -f deploy/sidecar-cuda.Dockerfile -t ghcr.io/sluice-dev/sluice-sidecar-cuda:0.1.0 .
# (or `make images`). No GPU is needed to build. SLUICE_CUDA_ARCHS picks the GPU architectures
# the kernels are compiled for (80: A100, 89: L4/L40, 90: H100/H200; PTX of the last for newer
# GPUs), as `make build-cuda` does on a host. CUDA 13.0, as `make build-cuda`: the node needs an
# NVIDIA driver 580 or newer.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
ARG RUST_VERSION=1.95.0
# Base images, as build arguments (a registry mirror, or local images on a machine with none).
ARG BUILD_IMAGE=docker.io/nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}
ARG RUNTIME_IMAGE=docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}

FROM ${BUILD_IMAGE} AS build
ARG RUST_VERSION
ARG SLUICE_CUDA_ARCHS="80 90"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY crds ./crds
COPY operator ./operator
COPY sidecar ./sidecar
COPY e2e ./e2e
COPY telemetry ./telemetry
COPY fuzz ./fuzz
# Patched upstream crates ([patch.crates-io] in Cargo.toml).
COPY vendor ./vendor
# The engine's build scripts read one architecture from CUDA_COMPUTE_CAP (there is no GPU to ask);
# the nvcc wrapper compiles each kernel for all of SLUICE_CUDA_ARCHS.
COPY scripts/nvcc-archs.sh /tmp/nvcc-archs.sh
RUN mv /usr/local/cuda/bin/nvcc /usr/local/cuda/bin/nvcc-real \
 && install -m 0755 /tmp/nvcc-archs.sh /usr/local/cuda/bin/nvcc
ENV SLUICE_CUDA_ARCHS=${SLUICE_CUDA_ARCHS}
ENV CUDA_COMPUTE_CAP=80
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-sidecar --features cuda \
 && install -D -m 0755 target/release/sluice-sidecar /out/sluice-sidecar

# The CUDA runtime libraries (cuBLAS, cuRAND, NVRTC) without the compiler.
FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="sluice-sidecar-cuda" \
      org.opencontainers.image.description="sluice data plane: OpenAI API on mistral.rs (NVIDIA CUDA)" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/sluice-sidecar"]
CMD ["serve"]

# The binary built on the host instead (`make images-from-host`), from a build context holding
# it at bin/sluice-sidecar.
FROM runtime AS from-host
COPY bin/sluice-sidecar /usr/local/bin/sluice-sidecar

# The default target: the binary built from source above.
FROM runtime AS from-source
COPY --from=build /out/sluice-sidecar /usr/local/bin/sluice-sidecar
