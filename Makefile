# `make run`: install, build the embedded demo, run (or resume) it.  `make test`: install, run the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test lint bench clean-demo

# constraints.txt: the exact versions tested (pyproject.toml holds the ranges users install from).
$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -c constraints.txt -e '.[test,eval,quant,ray]'
	touch $@

run: $(VENV)/.base
	$(PY) -m pipeline.demo demo
	$(VENV)/bin/llava-batch run jobs/demo.toml

test: $(VENV)/.test
	$(PY) -m pytest -q

lint: $(VENV)/.test
	$(VENV)/bin/ruff check pipeline quant tests benchmarks

clean-demo:
	rm -rf demo
