# The two set-up commands of the README:
#   make run    build .venv and run the example job (local Ray, local disk, built-in model)
#   make test   build .venv with the test extras, lint (ruff) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?= manifests/example.yaml

.PHONY: run test lint bench venv chromium

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# CPU machines: take torch's CPU build explicitly (a bare torch requirement pulls CUDA).
	# GPU machines keep whatever CUDA build of torch is already installed in the venv.
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; \
	  else $(PY) -m pip install torch==2.13.0; fi; fi
	$(PY) -m pip install -e . 
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps open-clip-torch
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) jobs/run.py $(SPEC)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The HTML report's test renders it in headless Chromium (Debian's `chromium` package).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; \
	  else echo "chromium not found and no apt-get: install Chromium for tests/test_jobs_report.py" >&2; exit 1; fi; fi

# Two pytest-xdist workers, tests handed out one by one (--dist load): much of the suite waits on
# subprocesses and Ray start-up, so two keep a 2-core machine busy. Every port is free_port()/0 and
# every path per test, so the workers do not collide; a session fixture (moto, the local Ray, the
# tiny model) is made once per worker. TEST_WORKERS=0 runs the suite in this process.
# (No xdist_group: with pytest 9.2, xdist 3.8's loadgroup ignores the groups; it renames nodeids
# through item._nodeid, which pytest no longer reads.)
TEST_WORKERS ?= 2

test: lint chromium
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

bench: $(VENV)/.installed-test
	$(PY) bench/side_by_side.py
