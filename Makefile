# Two commands do all set-up on a fresh machine with only Python and pip:
#   make run   - create .venv, install, start the server on the embedded default model
#   make test  - create .venv, install with [dev], run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000

SDK025 ?= .venv-sdk025

.PHONY: run test test-gpu-prep install install-dev bench clean chromium

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# torch is pinned on its own first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "tinker-cookbook==0.6.1"
	touch $@

# The oldest protobuf-era SDK, for the conformance scenarios run against SDK 0.25 (skipped when absent).
$(SDK025)/.ok:
	rm -rf $(SDK025)
	$(PYTHON) -m venv $(SDK025) && $(SDK025)/bin/pip install -q 'tinker==0.25.*' && touch $@ \
	  || { rm -rf $(SDK025); echo "warning: could not build $(SDK025); the SDK 0.25 conformance test will skip"; }

install: $(VENV)/.base
install-dev: $(VENV)/.dev

run: $(VENV)/.base
	$(VENV)/bin/tinker-jax serve --host $(HOST) --port $(PORT)

# Chromium for the console's browser test (tests/test_conformance.py): the distribution's package, installed when
# this runs as root with apt-get (CI); elsewhere, or if that fails, the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; \
	  }; } || echo "warning: Chromium is not installed; the console's browser test will skip"

test: $(VENV)/.dev $(SDK025)/.ok chromium
	TINKER_JAX_TEST_FAST_EXIT=1 $(PY) scripts/run_tests.py -m "not gpu_prep"

# The GPU benchmark scripts' dry runs (~2 min): before a GPU session, so its minutes go to measuring.
test-gpu-prep: $(VENV)/.dev
	$(PY) -m pytest -q -m gpu_prep tests

bench: $(VENV)/.dev
	$(VENV)/bin/tinker-jax bench --suite cpu --out benchmarks/cpu-latest.json

clean:
	rm -rf $(VENV) $(SDK025) build *.egg-info
