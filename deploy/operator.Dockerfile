# syntax=docker/dockerfile:1
# sluice-operator image. Build from the repository root:
#   docker build -f deploy/operator.Dockerfile -t ghcr.io/sluice-dev/sluice-operator:0.1.0 .
# (or `make images`). The binary is built with the workspace's .cargo/config.toml, so the
# same x86-64-v3 baseline as every other build.

# The toolchain pinned in rust-toolchain.toml; Debian 12, the same glibc as the final stage.
ARG RUST_VERSION=1.95.0
# Base images, as build arguments so a machine with no registry builds the same file from local
# ones (scripts/image-bases.sh: Debian 12 from debootstrap, and a shell-less runtime like
# distroless's).
ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest to load it.
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
    cargo build --release --locked -p sluice-operator \
 && install -D -m 0755 target/release/sluice-operator /out/sluice-operator

# Distroless: glibc + libgcc/libstdc++ + CA certificates, no shell, no package manager.
FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="sluice-operator" \
      org.opencontainers.image.description="sluice operator: InferenceModel and RateLimitPolicy controller" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.licenses="Apache-2.0"
# 65532 = distroless "nonroot"; numeric so the kubelet can check runAsNonRoot.
USER 65532:65532
# Admin port: /metrics, /healthz, /readyz.
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

# The binary built on the host instead (`make images-from-host`: CI, air-gapped builds), from a
# build context holding it at bin/sluice-operator.
FROM runtime AS from-host
COPY bin/sluice-operator /usr/local/bin/sluice-operator

# The default target: the binary built from source above.
FROM runtime AS from-source
COPY --from=build /out/sluice-operator /usr/local/bin/sluice-operator
