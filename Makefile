# sg2-live: every setup step a fresh machine needs is here, so the README's two commands
# (`make serve`, `make test`) work from a clean clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= dev,direct,livekit
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system-deps test lint format serve bench clean web-client

# Python environment: recreated only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: system-deps $(STAMP)

# System packages and Go-built servers (idempotent; see scripts/install_system_deps.sh).
system-deps:
	./scripts/install_system_deps.sh

test: setup web-client
	$(PY) -m pytest $(PYTEST_ARGS)

# The browser client (TypeScript + Vite), served by `sg2 serve` at "/": rebuilt only when its sources,
# config or lockfile change; `npm ci` only when the lockfile does.
WEB := web_client
WEB_SOURCES := $(shell find $(WEB)/src -type f 2>/dev/null) $(WEB)/index.html $(WEB)/package.json \
	$(WEB)/package-lock.json $(WEB)/tsconfig.json $(WEB)/vite.config.ts

$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	touch $@

$(WEB)/dist/index.html: $(WEB_SOURCES) $(WEB)/node_modules/.package-lock.json
	cd $(WEB) && npm run build
	touch $@

web-client: $(WEB)/dist/index.html

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check sg2_runtime agent tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format sg2_runtime agent tests benchmarks
	$(VENV)/bin/ruff check --fix .

serve: setup web-client
	$(VENV)/bin/sg2 serve --preset tiny-random

bench: $(STAMP)
	$(PY) benchmarks/codec_bench.py
	$(PY) benchmarks/lm_bench.py
	$(PY) benchmarks/engine_bench.py
	$(PY) benchmarks/direct_bench.py
	$(PY) benchmarks/server_bench.py
	$(PY) benchmarks/livekit_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info $(WEB)/dist $(WEB)/node_modules
