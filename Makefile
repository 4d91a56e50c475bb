# tnas — every set-up step lives here, so a fresh clone needs only `make serve` or `make test`.
#
# libtorch comes from the PyPI wheel torch==2.11.0 in a virtual environment kept outside the clone
# (TNAS_CACHE), so every clone on the machine reuses one 4.6 GB install.

TNAS_CACHE ?= $(HOME)/.cache/tnas
VENV := $(TNAS_CACHE)/venv
PYTHON := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.tnas-setup-2
VALIDATOR_STAMP := $(VENV)/.tnas-kubernetes-validate-1.37.0
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export PYTHON_SYS_EXECUTABLE := $(PYTHON)

DEFAULT_MODEL ?= omniglot-tnas-six-clean2
HOST ?= 127.0.0.1
PORT ?= 8080
TEST_THREADS ?= 2

.PHONY: setup replica-setup build release serve test bench load fuzz openapi clean-venv

setup: $(TORCH_STAMP)

$(TORCH_STAMP):
	mkdir -p $(TNAS_CACHE)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check torch==2.11.0 nvidia-cuda-crt==13.0.88 numpy pillow safetensors
	touch $@

# What the multi-replica test and `make load` start beside the servers, and what checks deploy/:
# redis-server and HAProxy from the distribution's packages (installed as root when missing), and
# the offline Kubernetes schema validator from PyPI in the virtual environment.
replica-setup: setup $(VALIDATOR_STAMP)
	@command -v redis-server >/dev/null && command -v haproxy >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server haproxy; }

$(VALIDATOR_STAMP): $(TORCH_STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
	touch $@

build: setup
	cargo build --all-targets

release: setup
	cargo build --release --bins

serve: release
	./target/release/tnas-server --models models --default-model $(DEFAULT_MODEL) --host $(HOST) --port $(PORT)

# Formatting and lints first (the image's toolchain ships rustfmt and clippy), the deployment files
# against the Kubernetes schemas (offline) and HAProxy, then every test.
test: replica-setup
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
	haproxy -c -q -f deploy/haproxy.cfg
	cargo test --lib --bins --tests -- --test-threads=$(TEST_THREADS)

# Latency next to PyTorch eager doing the same work, and server throughput; prints figures.
bench: setup
	cargo bench --bench adapt

# One client alone, then 60 s of 32 clients of 20-way tasks beside hostile clients (invalid requests,
# requests over the budgets, half-open connections) against the release server; prints goodput,
# latency, status counts and memory, and fails on a 5xx other than 504, goodput under 80% of one
# client's throughput, a hostile request without its own 4xx, memory not returned, or lost readiness.
# Then 20 s of 8 clients through HAProxy to two replicas sharing Redis: throughput and memory of
# each; fails on a 5xx, an idle replica, or a stored genotype a replica cannot serve.
load: replica-setup
	cargo bench --bench load
	cargo bench --bench load_replicas

clean-venv:
	rm -rf $(VENV)

# A long run of the property-based fuzz tests of request parsing and image decoding.
fuzz: setup
	PROPTEST_CASES=$${PROPTEST_CASES:-50000} cargo test --test fuzz_parsing -- --test-threads=$(TEST_THREADS)

# Regenerates the committed OpenAPI document from the code (a test fails when they differ).
openapi: setup
	cargo run --quiet --bin tnas-server -- --print-openapi > openapi/openapi.json
