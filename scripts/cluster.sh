#!/usr/bin/env bash
# A real Kubernetes control plane on this machine: etcd, kube-apiserver (TLS, client
# certificates, service-account tokens, RBAC, the aggregation layer) and
# kube-controller-manager (Deployment, ReplicaSet, garbage collector, HPA, namespace and
# service-account controllers). No scheduler
# and no kubelet: the cluster tests play the kubelet (e2e/src/kubelet.rs), running each pod as
# real processes in a network namespace of its own on a host-only bridge, which is also where
# the API server listens (so pods reach it as they would in a cluster). Needs root (network
# namespaces); etcd listens on loopback only.
#
#   scripts/cluster.sh [--dir DIR]
#
# Builds the servers once from the Go module in e2e/cluster (cached in
# $SLUICE_CLUSTER_CACHE, default $HOME/.cache/sluice/cluster/<version>), starts them, writes
# DIR/kubeconfig (cluster-admin) and DIR/ready, and runs until interrupted or until the process
# that started it exits; everything it started stops with it. `make cluster` runs it in the
# foreground; the tests start it per test binary.
#
# SIGUSR1 restarts kube-apiserver (SIGKILL, then the same command line; etcd keeps the data):
# a fault the tests inject. Once it is ready again, DIR/apiserver-restarts holds how many times.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KUBE_VERSION="$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' "$ROOT/e2e/cluster/go.mod")"
ETCD_VERSION="$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\)$/\1/p;s/^\tgo.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\)$/\1/p' "$ROOT/e2e/cluster/go.mod" | head -n1)"
CACHE="${SLUICE_CLUSTER_CACHE:-$HOME/.cache/sluice/cluster/$KUBE_VERSION-etcd-$ETCD_VERSION}"
DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    *) echo "usage: $0 [--dir DIR] [--build-only]" >&2; exit 2 ;;
  esac
done
WATCH_PID="$PPID"
# The pod network: bridge slcN with 10.N.0.1/16, N from our PID so two clusters can coexist.
NET_ID=$((100 + $$ % 150))
BRIDGE="slc$NET_ID"
NET_PREFIX="10.$NET_ID"
API_HOST="$NET_PREFIX.0.1"

log() { echo "cluster: $*" >&2; }

build() {
  if [[ -x "$CACHE/kube-apiserver" && -x "$CACHE/kube-controller-manager" && -x "$CACHE/etcd" ]]; then
    return
  fi
  command -v go >/dev/null 2>&1 || {
    echo "cluster: needs the Go toolchain to build kube-apiserver, kube-controller-manager and etcd once (https://go.dev/dl/, or apt-get install golang); none found on PATH" >&2
    exit 1
  }
  log "building kube-apiserver, kube-controller-manager ($KUBE_VERSION) and etcd ($ETCD_VERSION) into $CACHE (once; several minutes)"
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  mkdir -p "$CACHE.tmp"
  (cd "$ROOT/e2e/cluster" && go build -trimpath -ldflags "$ldflags" -o "$CACHE.tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager ./etcd)
  rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
}

build
[[ -n "${BUILD_ONLY:-}" ]] && exit 0

DIR="${DIR:-$ROOT/.cache/cluster}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
rm -rf "$DIR/pki" "$DIR/etcd" "$DIR/ready" "$DIR/apiserver-restarts" "$DIR"/*.log "$DIR"/*.kubeconfig "$DIR/kubeconfig"
mkdir -p "$DIR/pki"

PIDS=()
remove_pods() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$BRIDGE-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  local link
  for link in $(ip -o link 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${BRIDGE}v" || true); do
    ip link del "$link" 2>/dev/null || true
  done
}
stop() {
  trap - EXIT INT TERM
  rm -f "$DIR/ready"
  # Pods first, then the controller manager and the API server, etcd last. The API server's
  # graceful shutdown can take a minute; nothing here needs it, so after 5 s it is killed.
  remove_pods
  local pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid="${PIDS[i]}"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$DIR/etcd"
}
trap stop EXIT
trap 'exit 0' INT TERM
# Acted on by the loop at the end (bash runs a trap between commands; the loop sleeps 1 s).
RESTART_APISERVER=""
API_RESTARTS=0
trap 'RESTART_APISERVER=1' USR1

remove_pods
ip link del "$BRIDGE" 2>/dev/null || true
ip link add "$BRIDGE" type bridge 2>/dev/null || {
  echo "cluster: cannot create the pod network (bridge $BRIDGE): needs root, or CAP_NET_ADMIN" >&2; exit 1; }
ip addr add "$API_HOST/16" dev "$BRIDGE"
ip link set "$BRIDGE" up
echo "$BRIDGE $NET_PREFIX" >"$DIR/network"

# Ports the kernel hands out now; a race with another process is retried by the caller.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port); KCM_PORT=$(free_port)

# --- certificates: a CA, the API server's serving certificate, client certificates ----------
PKI="$DIR/pki"
ssl() { openssl "$@" 2>/dev/null; }
ssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=sluice-test-ca" \
  -keyout "$PKI/ca.key" -out "$PKI/ca.crt"
client_cert() { # name CN O
  ssl req -newkey rsa:2048 -nodes -subj "/CN=$2${3:+/O=$3}" -keyout "$PKI/$1.key" -out "$PKI/$1.csr"
  ssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
    -extfile <(printf 'extendedKeyUsage=clientAuth') -out "$PKI/$1.crt"
}
ssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr"
ssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
  -extfile <(printf 'subjectAltName=IP:%s,IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth' "$API_HOST") \
  -out "$PKI/apiserver.crt"
client_cert admin admin system:masters
client_cert controller-manager system:kube-controller-manager system:masters
# The aggregation layer (kube-aggregator inside kube-apiserver), as kubeadm sets it up: a
# front-proxy CA of its own, and the client certificate the API server presents when it proxies
# to an aggregated API server, which trusts the X-Remote-* headers of requests signed by that CA.
ssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=sluice-test-front-proxy-ca" \
  -keyout "$PKI/front-proxy-ca.key" -out "$PKI/front-proxy-ca.crt"
ssl req -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" \
  -keyout "$PKI/front-proxy-client.key" -out "$PKI/front-proxy-client.csr"
ssl x509 -req -in "$PKI/front-proxy-client.csr" -CA "$PKI/front-proxy-ca.crt" -CAkey "$PKI/front-proxy-ca.key" \
  -CAcreateserial -days 2 -extfile <(printf 'extendedKeyUsage=clientAuth') -out "$PKI/front-proxy-client.crt"
# A serving certificate for an aggregated API server the tests run on this host, at the bridge
# address (e2e/src/metrics_adapter.rs, the custom metrics API). Its APIService skips TLS
# verification: the aggregator checks the name <service>.<namespace>.svc, which no test knows here.
ssl req -newkey rsa:2048 -nodes -subj "/CN=aggregated-apiserver" \
  -keyout "$PKI/aggregated-apiserver.key" -out "$PKI/aggregated-apiserver.csr"
ssl x509 -req -in "$PKI/aggregated-apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
  -extfile <(printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth' "$API_HOST") \
  -out "$PKI/aggregated-apiserver.crt"
ssl genrsa -out "$PKI/sa.key" 2048
ssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"

kubeconfig() { # file user
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: https://$API_HOST:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: sluice-test
  context: {cluster: sluice-test, user: $2, namespace: default}
current-context: sluice-test
EOF
}
kubeconfig "$DIR/admin.kubeconfig" admin
kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager

# --- the servers ---------------------------------------------------------------------------
"$CACHE/etcd" --name sluice-test --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "sluice-test=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)

# --enable-aggregator-routing: an APIService's Service has no ClusterIP anyone routes here (no
# kube-proxy), so the aggregator dials the address in the Service's EndpointSlice instead.
start_apiserver() {
  "$CACHE/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$API_HOST" --advertise-address "$API_HOST" --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode RBAC \
    --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --v 1 >>"$DIR/kube-apiserver.log" 2>&1 &
  API_PID=$!
}
start_apiserver
PIDS+=("$API_PID")
API_INDEX=$((${#PIDS[@]} - 1))

curl_api() { curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://$API_HOST:$API_PORT$1"; }
await_apiserver() {
  for _ in $(seq 1 300); do
    curl_api /readyz >/dev/null 2>&1 && return
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { log "a server exited at start; last lines of its log:"; tail -n 20 "$DIR"/*.log >&2; exit 1; }
    done
    sleep 0.2
  done
  curl_api /readyz >/dev/null || { log "kube-apiserver not ready after 60 s; see $DIR/kube-apiserver.log"; exit 1; }
}
await_apiserver

"$CACHE/kube-controller-manager" \
  --kubeconfig "$DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$DIR/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
  --controllers deployment-controller,replicaset-controller,garbage-collector-controller,horizontal-pod-autoscaler-controller,namespace-controller,serviceaccount-controller \
  --leader-elect=false --use-service-account-credentials=false \
  --horizontal-pod-autoscaler-sync-period 5s \
  --v 1 >"$DIR/kube-controller-manager.log" 2>&1 &
PIDS+=($!)

# A crash, not a shutdown: no graceful close of connections or watches; then the same command
# line, as a supervisor would start it again.
restart_apiserver() {
  log "restarting kube-apiserver (pid ${PIDS[API_INDEX]}): SIGKILL, then the same command line"
  kill -9 "${PIDS[API_INDEX]}" 2>/dev/null || true
  wait "${PIDS[API_INDEX]}" 2>/dev/null || true
  start_apiserver
  PIDS[API_INDEX]="$API_PID"
  await_apiserver
  API_RESTARTS=$((API_RESTARTS + 1))
  echo "$API_RESTARTS" >"$DIR/apiserver-restarts"
  log "kube-apiserver restarted (pid $API_PID) and ready"
}

cp "$DIR/admin.kubeconfig" "$DIR/kubeconfig"
echo "$API_PORT" >"$DIR/ready"
log "ready: KUBECONFIG=$DIR/kubeconfig (https://$API_HOST:$API_PORT); logs in $DIR"

# Until interrupted, or until whoever started us (a test binary) is gone.
while kill -0 "$WATCH_PID" 2>/dev/null; do
  if [[ -n "$RESTART_APISERVER" ]]; then
    RESTART_APISERVER=""
    restart_apiserver
  fi
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { log "server $pid exited; see the logs in $DIR"; exit 1; }
  done
  sleep 1
done
