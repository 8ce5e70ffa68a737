# `make run`: install, build the embedded demo, run (or resume) it.  `make test`: install, run the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test compat lint bench clean-demo

# constraints.txt: the exact versions tested (pyproject.toml holds the ranges users install from).
$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -c constraints.txt -e '.[test,lint,eval,quant,ray]'
	touch $@

run: $(VENV)/.base
	$(PY) -m pipeline.testing.demo demo
	$(VENV)/bin/llava-batch run jobs/demo.toml

test: $(VENV)/.test
	$(PY) -m pytest -q

# The fast part of the suite on the lowest supported Python + torch + transformers (constraints-lowest.txt).
PYTHON_LOWEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python /usr/bin/python3.10 /usr/local/bin/python3.10))
LOWEST ?= .venv-lowest
COMPAT_TESTS := tests/engine tests/model/test_fast_engine_decoder.py \
	tests/model/test_fused_linear.py tests/test_devices.py tests/kernels \
	tests/e2e/test_job_errors.py tests/data tests/e2e/test_resume.py tests/e2e/test_multi_prompt.py

$(LOWEST)/.installed: pyproject.toml constraints-lowest.txt
	@test -n "$(PYTHON_LOWEST)" || { echo "make compat: no Python 3.10 found; set PYTHON_LOWEST=/path/to/python3.10" >&2; exit 2; }
	test -x $(LOWEST)/bin/python || $(PYTHON_LOWEST) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-lowest.txt -e '.[test]'
	touch $@

compat: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

# ruff, and the import contracts in pyproject.toml ([tool.importlinter]): the flow runs one way, no circles.
lint: $(VENV)/.test
	$(VENV)/bin/ruff check pipeline quant tests benchmarks
	$(VENV)/bin/lint-imports --no-logo --no-cache

clean-demo:
	rm -rf demo
