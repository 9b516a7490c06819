# nbreduce — two commands: `make demo` and `make test`. Everything is installed here, pinned.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed
# inside the checkout: reachable by the demo users' own accounts (a home under /root would not be)
export NBREDUCE_HOME ?= $(CURDIR)/.nbreduce
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: setup demo test test-fast lint bench chaos lock browser system clean images images-ci images-base deploy-test

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock package.json package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install -q --python $(BIN)/python -r requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's Chromium for the browser tests (Playwright cannot download its own here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# setfacl for the archive's experiment groups (the demo and the isolation tests, as root)
system:
	@command -v setfacl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acl >/dev/null; } || true

demo: setup system
	$(BIN)/nbreduce demo

lint: setup
	$(BIN)/ruff check runner tests bench deploy

test: setup browser system lint
	$(BIN)/pytest -p no:cacheprovider --durations=30
	# templates run in their environments' kernels (their notebooks name them): build every environment first
	$(BIN)/nbreduce env build --all
	JUPYTER_PATH=$(NBREDUCE_HOME)/jupyter $(BIN)/pytest -p no:cacheprovider --nbval-lax notebooks/
	# the images built and the platform run from its Kubernetes manifests, with podman (.ci/run installs it)
	@if command -v podman >/dev/null && command -v debootstrap >/dev/null && [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory deploy-test; \
	else echo "deploy-test skipped: needs root, podman and debootstrap (apt-get install podman runc debootstrap)"; fi

bench: setup
	$(BIN)/python -m bench.run --output docs/benchmarks.md
	$(BIN)/python -m bench.bench_state --output docs/benchmarks.md
	$(BIN)/python -m bench.bench_portal --output docs/benchmarks.md
	$(BIN)/python -m bench.bench_progress --output docs/benchmarks.md

# Faults injected into the running platform (kill storm, broker outages, two runners with one killed, fuzz set,
# archive read-only or full); writes docs/reliability.md. A reduced form runs in `make test` (tests/test_chaos.py).
chaos: setup
	$(BIN)/python -m bench.chaos --output docs/reliability.md

# Re-resolve the pinned lock after changing dependencies in pyproject.toml.
lock:
	$(UV) pip compile -q pyproject.toml --extra test -o requirements.lock

clean:
	rm -rf $(VENV) node_modules .pytest_cache test-artifacts

# -- container images and the platform on podman (docs/deployment.md) -----------------------------------------
# Every image from the repository's Dockerfiles, tagged localhost/<name>:$(TAG), on a Python base made
# locally from Debian's archive (deploy/images/base/build-base.sh: no registry is needed). Builds mount
# the host's uv cache, and its CA bundle and pip configuration where they exist (a TLS-inspecting proxy).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TAG ?= $(VERSION)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
PODMAN ?= podman
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
IMAGE_CACHE ?= $(HOME)/.cache/nbreduce/images
#: the uv-locked environments, one runner image each (mantid, conda: `make image-runner-mantid` where the
#: conda channels are reachable; minimal is for tests)
ENVIRONMENTS := diffraction spectroscopy sans reflectometry muon imaging scipp
#: the runner group of the CI overlay (deploy/overlays/ci)
CI_ENVIRONMENT := spectroscopy
BASE_IMAGE = localhost/nbreduce-python:3.11-bookworm-$(shell cat deploy/images/base/build-base.sh | sha256sum | cut -c1-12)-$(shell $(PYTHON) -c 'import platform; print(platform.python_version())')
BUILD_MOUNTS = -v $(shell $(UV) cache dir):/root/.cache/uv \
	$(foreach f,/etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/xdg/pip,$(if $(wildcard $(f)),-v $(f):$(f):ro))
BUILD = $(PODMAN) build --layers --pull=never $(BUILD_MOUNTS) --build-arg VERSION=$(VERSION) \
	--build-arg REVISION=$(REVISION)
IMAGE_LOGS := test-artifacts/images
# $(call TIMED,name,command): the build, its log in $(IMAGE_LOGS)/<name>.log (the end shown on failure), its time
TIMED = @mkdir -p $(IMAGE_LOGS); start=$$(date +%s); echo "image $(1): building"; \
	$(2) >$(IMAGE_LOGS)/$(1).log 2>&1 || { tail -40 $(IMAGE_LOGS)/$(1).log; echo "image $(1): build failed"; exit 1; }; \
	echo "image $(1): built in $$(( $$(date +%s) - start )) s"

images-base: setup
	@mkdir -p $(IMAGE_CACHE)
	@start=$$(date +%s); deploy/images/base/build-base.sh $(BASE_IMAGE) $(PYTHON) $(IMAGE_CACHE) \
		&& echo "image base: ready in $$(( $$(date +%s) - start )) s"

image-nbreduce: images-base
	$(call TIMED,nbreduce,$(BUILD) -f deploy/images/nbreduce/Dockerfile --build-arg PYTHON_IMAGE=$(BASE_IMAGE) \
		--build-arg UV_VERSION=$(UV_VERSION) -t localhost/nbreduce:$(TAG) .)

image-runner-%: image-nbreduce
	$(call TIMED,nbreduce-runner-$*,$(BUILD) -f kernels/Dockerfile --build-arg NBREDUCE_IMAGE=localhost/nbreduce:$(TAG) \
		--build-arg ENVIRONMENT=$* --build-arg ENVIRONMENT_SHA256=$$(sha256sum environments/$*/requirements.lock | cut -d' ' -f1) \
		-t localhost/nbreduce-runner-$*:$(TAG) .)

image-runner-mantid: image-nbreduce
	$(call TIMED,nbreduce-runner-mantid,$(PODMAN) build --layers --pull=missing $(BUILD_MOUNTS) -f kernels/mantid/Dockerfile \
		--build-arg NBREDUCE_IMAGE=localhost/nbreduce:$(TAG) --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
		--build-arg ENVIRONMENT_SHA256=$$(sha256sum environments/mantid/environment.yml | cut -d' ' -f1) \
		-t localhost/nbreduce-runner-mantid:$(TAG) .)

# the z2jh chart's hub image where quay.io is reachable (HUB_IMAGE=quay.io/jupyterhub/k8s-hub:<chart version>),
# else the nbreduce image: the same Dockerfile steps, and the CI overlay's hub runs on it
HUB_IMAGE ?= localhost/nbreduce:$(TAG)
image-hub: image-nbreduce
	$(call TIMED,nbreduce-hub,$(BUILD) -f deploy/images/hub/Dockerfile --build-arg HUB_IMAGE=$(HUB_IMAGE) \
		-t localhost/nbreduce-hub:$(TAG) .)

image-proxy: images-base
	$(call TIMED,nbreduce-proxy,$(BUILD) -f deploy/images/proxy/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		-t localhost/nbreduce-proxy:$(TAG) .)

image-lab: $(foreach e,$(ENVIRONMENTS),image-runner-$(e))
	$(call TIMED,nbreduce-lab,$(BUILD) -f deploy/images/lab/Dockerfile --build-arg NBREDUCE_IMAGE=localhost/nbreduce:$(TAG) \
		$(foreach e,$(ENVIRONMENTS),--build-arg $(shell echo $(e) | tr a-z A-Z)_IMAGE=localhost/nbreduce-runner-$(e):$(TAG)) \
		-t localhost/nbreduce-lab:$(TAG) .)

# every image of the deployment (the mantid runner needs the conda channels: make image-runner-mantid)
images: image-nbreduce $(foreach e,$(ENVIRONMENTS),image-runner-$(e)) image-hub image-proxy image-lab
	@echo "images: every image but nbreduce-runner-mantid (conda channels: make image-runner-mantid)"
	@$(PODMAN) images --filter reference='localhost/nbreduce*:$(TAG)'

# what deploy/overlays/ci runs
images-ci: image-nbreduce image-runner-$(CI_ENVIRONMENT) image-hub image-proxy

# the CI overlay on `podman kube play`: scale-out, kill, portal and hub, clean teardown (tests/test_containers.py)
deploy-test: images-ci
	@start=$$(date +%s); DEPLOY_TEST=1 $(BIN)/pytest -p no:cacheprovider tests/test_containers.py; \
		status=$$?; echo "deploy-test: platform tests in $$(( $$(date +%s) - start )) s"; exit $$status
