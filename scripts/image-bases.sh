#!/usr/bin/env bash
# Base images for a machine that reaches no container registry: Debian 12 (bookworm) from
# Debian's own packages with debootstrap, made once and cached outside the clone
# ($SLUICE_IMAGE_CACHE, default ~/.cache/sluice/images), imported into podman (or docker) as
#
#   localhost/sluice-bookworm:12     the whole minbase system (the build stages' base)
#   localhost/sluice-runtime-cc:12   what distroless/cc-debian12 holds: glibc, libgcc, libstdc++,
#                                    CA certificates, /etc/passwd with nonroot (65532); no shell
#
# The Dockerfiles take them as build arguments (BUILD_IMAGE, RUNTIME_IMAGE); with a registry
# they default to the upstream rust and distroless images instead.
#
#   scripts/image-bases.sh [DOCKER]      (DOCKER: podman, the default, or docker)
set -euo pipefail

DOCKER="${1:-${DOCKER:-podman}}"
CACHE="${SLUICE_IMAGE_CACHE:-$HOME/.cache/sluice/images}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$CACHE/bookworm-rootfs"
RUNTIME="$CACHE/runtime-cc-rootfs"
log() { echo "image-bases: $*" >&2; }

if [[ ! -f "$ROOTFS/.complete" ]]; then
  command -v debootstrap >/dev/null || {
    echo "image-bases: needs debootstrap (apt-get install debootstrap) and root" >&2; exit 1; }
  log "debootstrap bookworm into $ROOTFS (once; a few minutes)"
  rm -rf "$ROOTFS" && mkdir -p "$ROOTFS"
  debootstrap --variant=minbase --include=ca-certificates,netbase bookworm "$ROOTFS" "$MIRROR" >&2
  touch "$ROOTFS/.complete"
fi

if [[ ! -f "$RUNTIME/.complete" ]]; then
  log "assembling the shell-less runtime root filesystem in $RUNTIME"
  rm -rf "$RUNTIME" && mkdir -p "$RUNTIME"/usr/{bin,lib,lib64,sbin}
  # The usrmerge links first (/lib64 -> usr/lib64 ...): the loader's path goes through them.
  for link in bin lib lib64 sbin; do
    if [[ -L "$ROOTFS/$link" ]]; then cp -a "$ROOTFS/$link" "$RUNTIME/$link"; fi
  done
  # The packages distroless/cc-debian12 is made of, file by file (no dpkg, no shell).
  for pkg in libc6 libgcc-s1 libstdc++6 ca-certificates tzdata netbase; do
    chroot "$ROOTFS" dpkg -L "$pkg" | while read -r path; do
      if [[ -f "$ROOTFS$path" || -L "$ROOTFS$path" ]]; then
        mkdir -p "$RUNTIME$(dirname "$path")"
        cp -a "$ROOTFS$path" "$RUNTIME$path"
      fi
    done
  done
  cp -a "$ROOTFS/etc/ssl" "$RUNTIME/etc/"
  mkdir -p "$RUNTIME/tmp" "$RUNTIME/home/nonroot" "$RUNTIME/root"
  chmod 1777 "$RUNTIME/tmp"
  chown 65532:65532 "$RUNTIME/home/nonroot"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$RUNTIME/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$RUNTIME/etc/group"
  rm -f "$RUNTIME/bin/sh" "$RUNTIME/usr/bin/sh"
  touch "$RUNTIME/.complete"
fi

import() { # rootfs tag
  if ! "$DOCKER" image exists "$2" 2>/dev/null && ! "$DOCKER" image inspect "$2" >/dev/null 2>&1; then
    log "importing $2"
    tar --exclude=./.complete -C "$1" -c . | "$DOCKER" import - "$2" >/dev/null
  fi
}
import "$ROOTFS" localhost/sluice-bookworm:12
import "$RUNTIME" localhost/sluice-runtime-cc:12
