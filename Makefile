# cpt: the ContinualPretrain operator. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

##@ Setup
.PHONY: help install cluster-build s3server-build node-build host-setup prometheus
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"} /^##@/ {printf "\n\033[1m%s\033[0m\n", substr($$0, 5)} /^[a-zA-Z0-9_-]+:.*##/ {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Always run: cheap when warm (about 2 s). Each checkout has its own .venv; the packages come
# from uv's machine-wide cache, so a second checkout's venv takes seconds, not a download.
install: ## Create this checkout's .venv (re-synced when the lock changes) and install the checkout
	@hack/install.sh >/dev/null

cluster-build: ## Build the local control plane binaries (cached by go.sum hash)
	hack/devcluster/build.sh

s3server-build: ## Build the compiled loopback S3 server (versitygw; cached by go.sum hash)
	@hack/s3server/build.sh >/dev/null

node-build: ## Build the real node's kubelet and pause binary (cached by their own go.sum hash)
	@hack/node/build.sh >/dev/null

prometheus: ## Unpack Debian's Prometheus server under the cpt cache (the e2e metrics test)
	@hack/prometheus/install.sh >/dev/null

# Debian packages for images and the real node (runc, containerd, buildah, mmdebstrap, CNI
# plugins); a no-op when present. Not fatal here: without root the containers tier says
# what is missing (and fails under CI=true).
host-setup: ## Install the host packages the images and the real node need (apt; root)
	@hack/node/host-setup.sh || echo "host-setup: not installed; the containers tier will say what is missing" >&2

##@ Demo
.PHONY: demo
demo: install ## Run the tiny end-to-end job in local mode (tokenize -> train -> export -> sample)
	$(PY) hack/demo.py

##@ Test
.PHONY: test test-unit test-integration test-e2e test-faults test-parity test-containers
test: install cluster-build s3server-build host-setup prometheus ## The whole suite (unit, integration, parity, e2e, containers)
	$(PYTEST) --durations=25 tests
test-unit: install ## Fast pure tests only
	$(PYTEST) -m unit tests
test-integration: install cluster-build s3server-build ## Control plane and S3 server tests
	$(PYTEST) -m integration tests
test-e2e: install cluster-build prometheus ## Whole pipeline through the operator on the local control plane
	$(PYTEST) -m e2e tests
test-faults: install cluster-build ## Fault-injection matrix
	$(PYTEST) -m faults tests
test-parity: install ## Native model and tokenize stage vs transformers/tokenizers, exactly
	$(PYTEST) -m parity tests
test-containers: install cluster-build host-setup node-build ## cpt's images as real containers on a real kubelet node
	$(PYTEST) -m containers tests/containers

##@ Lint
.PHONY: lint
lint: install ## ruff + mypy
	$(VENV)/bin/ruff check operator training tests hack bench
	$(VENV)/bin/ruff format --check operator training tests hack bench
	$(VENV)/bin/mypy
	$(VENV)/bin/cpt crds --check

##@ Generate
.PHONY: crds chart
crds: install ## Regenerate crds/, the chart's CRD copy, JSON schemas and doc tables from the models
	$(VENV)/bin/cpt crds
chart: install cluster-build ## Check values.schema.json, helm lint and render the chart
	$(PY) hack/chart/values_schema.py --check
	$$(hack/devcluster/build.sh | tail -n1)/helm lint --strict charts/cpt
	$(PY) hack/chart/render.py >/dev/null

##@ Images
.PHONY: images images-engine
IMAGES ?=
REGISTRY ?=
PUSH ?=
# Two paths: PUSH=1 builds every image (Neuron ones included) with docker/podman/nerdctl and
# pushes them to REGISTRY (a user's ECR); without it, buildah builds the images this host can
# build and exports OCI archives for the local real node (docs/images.md).
images: install ## Build the images (buildah, OCI archives; IMAGES=... to choose); PUSH=1 REGISTRY=... builds and pushes with docker/podman
ifeq ($(PUSH),1)
	images/build.sh --push $(if $(REGISTRY),--registry $(REGISTRY)) $(IMAGES)
else
	$(MAKE) --no-print-directory host-setup
	$(PY) hack/images/imagebuild.py build $(IMAGES)
endif
images-engine: ## Build (and with ARGS=--push push) the images with docker/podman/nerdctl
	images/build.sh $(ARGS)

##@ Local cluster
.PHONY: cluster-up cluster-down cluster-kubeconfig demo-cluster demo-cluster-down
cluster-up: install cluster-build ## Start the loopback control plane (etcd, apiserver, KCM, scheduler, KWOK, training-operator)
	$(PY) hack/devcluster/devcluster.py up
cluster-down: ## Stop the loopback control plane
	$(PY) hack/devcluster/devcluster.py down
cluster-kubeconfig: ## Print the admin kubeconfig path
	@$(PY) hack/devcluster/devcluster.py kubeconfig
demo-cluster: install cluster-build s3server-build host-setup node-build ## The operator itself on one machine: real node, images, helm install, a tiny run to Succeeded
	$(PY) hack/node/demo_cluster.py up
demo-cluster-down: ## Tear down what demo-cluster started (the run, the release, the node, the S3 server)
	$(PY) hack/node/demo_cluster.py down

##@ Benchmarks
.PHONY: bench
bench: install s3server-build ## Run the benchmarks; results in bench/results/, tables in docs/PERFORMANCE.md
	$(PY) bench/run.py
