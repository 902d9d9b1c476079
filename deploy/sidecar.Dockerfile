# syntax=docker/dockerfile:1
# sluice-sidecar image, CPU build (the operator's `--sidecar-image`). Build from the repository
# root:
#   docker build -f deploy/sidecar.Dockerfile -t ghcr.io/sluice-dev/sluice-sidecar:0.1.0 .
# (or `make images`). .cargo/config.toml sets the x86-64-v3 (AVX2+FMA) baseline candle's
# quantized kernels need; the sidecar refuses to start on a CPU without it.

ARG RUST_VERSION=1.95.0
# Base images, as build arguments so a machine with no registry builds the same file from local
# ones (scripts/image-bases.sh: Debian 12 from debootstrap, and a shell-less runtime like
# distroless's).
ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
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
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-sidecar \
 && install -D -m 0755 target/release/sluice-sidecar /out/sluice-sidecar

FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="sluice-sidecar" \
      org.opencontainers.image.description="sluice data plane: OpenAI API on mistral.rs (CPU, x86-64-v3)" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
# 8080: OpenAI API; 9090: admin (/metrics, /healthz, /readyz).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/sluice-sidecar"]
CMD ["serve"]

# The binary built on the host instead (`make images-from-host`: CI, air-gapped builds), from a
# build context holding it at bin/sluice-sidecar.
FROM runtime AS from-host
COPY bin/sluice-sidecar /usr/local/bin/sluice-sidecar

# The default target: the binary built from source above.
FROM runtime AS from-source
COPY --from=build /out/sluice-sidecar /usr/local/bin/sluice-sidecar
