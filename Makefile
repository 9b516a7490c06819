# nbreduce — two commands: `make demo` and `make test`. Everything is installed here, pinned.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed
export NBREDUCE_HOME ?= $(HOME)/.nbreduce
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: setup demo test test-fast lint bench chaos lock browser clean

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

demo: setup
	$(BIN)/nbreduce demo

lint: setup
	$(BIN)/ruff check runner tests bench deploy

test: setup browser lint
	$(BIN)/pytest -p no:cacheprovider
	# templates run in their environments' kernels (their notebooks name them): build every environment first
	$(BIN)/nbreduce env build --all
	JUPYTER_PATH=$(NBREDUCE_HOME)/jupyter $(BIN)/pytest -p no:cacheprovider --nbval-lax notebooks/

bench: setup
	$(BIN)/python -m bench.run --output docs/benchmarks.md
	$(BIN)/python -m bench.bench_state --output docs/benchmarks.md
	$(BIN)/python -m bench.bench_portal --output docs/benchmarks.md

# Faults injected into the running platform (kill storm, broker outages, two runners with one killed, fuzz set,
# archive read-only or full); writes docs/reliability.md. A reduced form runs in `make test` (tests/test_chaos.py).
chaos: setup
	$(BIN)/python -m bench.chaos --output docs/reliability.md

# Re-resolve the pinned lock after changing dependencies in pyproject.toml.
lock:
	$(UV) pip compile -q pyproject.toml --extra test -o requirements.lock

clean:
	rm -rf $(VENV) node_modules .pytest_cache test-artifacts
