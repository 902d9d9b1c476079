#!/usr/bin/env bash
# Packages binaries built on this machine into the runtime images (the Dockerfiles' `from-host`
# target): for CI, and for air-gapped builds with no Rust image to build in.
#
#   scripts/images-from-host.sh BIN_DIR TAG [IMAGE...]
#
# BIN_DIR holds sluice-operator and sluice-sidecar (e.g. target/release); they are stripped into
# a build context of their own. IMAGEs (default: operator sidecar sidecar-cuda) are tagged
# $IMAGE_REGISTRY/sluice-IMAGE:TAG. $BUILD_ARGS go to the CPU images' builds, $CUDA_BUILD_ARGS
# to the CUDA one's (e.g. BUILD_ARGS="--build-arg RUNTIME_IMAGE=localhost/sluice-runtime-cc:12").
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN_DIR="$1"; TAG="$2"; shift 2
[[ $# -gt 0 ]] && IMAGES=("$@") || IMAGES=(operator sidecar sidecar-cuda)
DOCKER="${DOCKER:-docker}"
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/sluice-dev}"
CONTEXT="$ROOT/.cache/images/context"

rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/bin"
for binary in sluice-operator sluice-sidecar; do
  [[ -x "$BIN_DIR/$binary" ]] || { echo "images-from-host: $BIN_DIR/$binary not built" >&2; exit 1; }
  # Without symbols: the dev profile's line tables alone are tens of MB.
  strip -o "$CONTEXT/bin/$binary" "$BIN_DIR/$binary"
done
for image in "${IMAGES[@]}"; do
  args="${BUILD_ARGS:-}"
  [[ "$image" == sidecar-cuda ]] && args="${CUDA_BUILD_ARGS:-}"
  # shellcheck disable=SC2086 # the build arguments are words
  "$DOCKER" build --target from-host $args -f "$ROOT/deploy/$image.Dockerfile" \
    -t "$REGISTRY/sluice-$image:$TAG" "$CONTEXT" >&2
done
