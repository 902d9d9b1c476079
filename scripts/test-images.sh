#!/usr/bin/env bash
# make test-images: the images built and run on this machine, with no registry.
#
# Base images from Debian's packages (scripts/image-bases.sh, cached), the workspace's binaries
# (the test build, stripped) packaged by the Dockerfiles' `from-host` target, then run with
# podman and runc the way a pod runs them:
#   - sidecar: UID 65532, read-only root filesystem, the demo model mounted read-only; /readyz
#     turns ready, a chat completion and a streamed one succeed, SIGTERM exits 0 within the
#     drain time;
#   - operator: `render -f` prints what the host binary prints; `run` with no cluster exits
#     non-zero with one line;
#   - both: non-root user, no shell, OCI labels, sizes within budget (printed);
#   - the CUDA Dockerfile's from-host target builds on a Debian base (no CUDA here).
#
#   scripts/test-images.sh BIN_DIR MODEL
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN_DIR="$1"; MODEL="$2"
export DOCKER="${DOCKER:-podman}" IMAGE_REGISTRY=localhost/sluice-test
TAG=test
OPERATOR="$IMAGE_REGISTRY/sluice-operator:$TAG"
SIDECAR="$IMAGE_REGISTRY/sluice-sidecar:$TAG"
DRAIN_SECS=30
OPERATOR_MAX_MB=60
SIDECAR_MAX_MB=150

fail() { echo "test-images: FAIL: $*" >&2; exit 1; }
say() { echo "test-images: $*" >&2; }
# runc, and ulimits below the machine's: what lets podman run containers on these machines.
RUN=("$DOCKER" run --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
[[ "$DOCKER" == podman ]] || RUN=("$DOCKER" run)
missing=""
for tool in "$DOCKER" runc debootstrap; do command -v "$tool" >/dev/null || missing+=" $tool"; done
if [[ "$DOCKER" == podman && -n "$missing" ]]; then
  say "installing podman, runc and debootstrap from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null \
    || fail "cannot install podman, runc and debootstrap (needs root and Debian's packages)"
fi
command -v "$DOCKER" >/dev/null || fail "$DOCKER not found"

start=$SECONDS
"$ROOT/scripts/image-bases.sh" "$DOCKER"
BUILD_ARGS="--build-arg BUILD_IMAGE=localhost/sluice-bookworm:12 --build-arg RUNTIME_IMAGE=localhost/sluice-runtime-cc:12" \
CUDA_BUILD_ARGS="--network host --build-arg RUNTIME_IMAGE=localhost/sluice-bookworm:12" \
  "$ROOT/scripts/images-from-host.sh" "$BIN_DIR" "$TAG"
say "bases and images built in $((SECONDS - start)) s"

# --- image facts ------------------------------------------------------------------------------
for image in "$OPERATOR:$OPERATOR_MAX_MB" "$SIDECAR:$SIDECAR_MAX_MB"; do
  name="${image%:*}"; max="${image##*:}"
  user=$("$DOCKER" image inspect "$name" --format '{{.Config.User}}')
  [[ "$user" == 65532:65532 ]] || fail "$name runs as '$user', not 65532:65532"
  title=$("$DOCKER" image inspect "$name" --format '{{index .Config.Labels "org.opencontainers.image.title"}}')
  [[ -n "$title" ]] || fail "$name has no org.opencontainers.image.title label"
  if "${RUN[@]}" --rm --entrypoint /bin/sh "$name" -c true 2>/dev/null; then
    fail "$name has a shell"
  fi
  bytes=$("$DOCKER" image inspect "$name" --format '{{.Size}}')
  mb=$((bytes / 1000000))
  say "$name: $mb MB (budget $max MB), user $user, no shell"
  ((mb <= max)) || fail "$name is $mb MB, over $max MB"
done

# --- the operator -----------------------------------------------------------------------------
for example in "$ROOT"/examples/inferencemodel*.yaml; do
  file="examples/$(basename "$example")"
  in_image=$("${RUN[@]}" --rm -v "$ROOT/examples:/examples:ro" "$OPERATOR" render -f "/$file")
  on_host=$("$BIN_DIR/sluice-operator" render -f "$ROOT/$file")
  [[ "$in_image" == "$on_host" ]] || fail "render -f $file differs between the image and the host binary"
done
say "operator: render -f prints what the host binary prints, for every example"
set +e
err=$("${RUN[@]}" --rm "$OPERATOR" run 2>&1 >/dev/null)
code=$?
set -e
((code != 0)) || fail "operator run with no cluster exited 0"
[[ $(wc -l <<<"$err") -eq 1 ]] || fail "operator run with no cluster printed more than one line: $err"
say "operator: run with no cluster exits $code: $err"

# --- the sidecar ------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API=$(free_port); ADMIN=$(free_port)
NAME="sluice-test-sidecar-$$"
cleanup() { "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${RUN[@]}" -d --name "$NAME" --network host --user 65532:65532 --read-only \
  -v "$MODEL:/models/model.gguf:ro" -e HF_HUB_OFFLINE=1 "$SIDECAR" \
  serve --model /models/model.gguf --served-name smollm2 \
  --listen "127.0.0.1:$API" --admin-listen "127.0.0.1:$ADMIN" --drain-grace-secs "$DRAIN_SECS" >/dev/null
for _ in $(seq 1 240); do
  curl -sf "127.0.0.1:$ADMIN/readyz" >/dev/null && break
  [[ $("$DOCKER" inspect "$NAME" --format '{{.State.Running}}') == true ]] || {
    "$DOCKER" logs "$NAME" >&2; fail "the sidecar container exited at start"; }
  sleep 0.5
done
curl -sf "127.0.0.1:$ADMIN/readyz" >/dev/null || fail "the sidecar never turned ready"
chat='{"model":"smollm2","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8'
body=$(curl -sf "127.0.0.1:$API/v1/chat/completions" -H 'content-type: application/json' -d "$chat}")
grep -q '"chat.completion"' <<<"$body" || fail "no chat completion: $body"
stream=$(curl -sfN "127.0.0.1:$API/v1/chat/completions" -H 'content-type: application/json' -d "$chat,\"stream\":true}")
grep -q '^data: \[DONE\]' <<<"$stream" || fail "the streamed completion did not end with [DONE]: $stream"
say "sidecar: ready as 65532 on a read-only root, answered a chat completion and a streamed one"
# SIGTERM, then SIGKILL after the drain time: exit code 0 means it drained and exited in time.
"$DOCKER" stop -t "$DRAIN_SECS" "$NAME" >/dev/null
code=$("$DOCKER" inspect "$NAME" --format '{{.State.ExitCode}}')
[[ "$code" == 0 ]] || { "$DOCKER" logs "$NAME" 2>&1 | tail -5 >&2; fail "the sidecar exited $code on SIGTERM"; }
say "sidecar: SIGTERM exits 0 within the ${DRAIN_SECS} s drain"
say "all passed in $((SECONDS - start)) s"
