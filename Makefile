VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: test demo lint venv bench-scan

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -x --durations=15

demo: venv
	$(VENV)/bin/rmamba demo --dir demo_plant

bench-scan: venv
	$(PY) benchmarks/scan_cpu.py
