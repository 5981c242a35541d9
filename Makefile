# The two front-door commands (README.md):
#   make demo   set up once, then run every stage on the embedded synthetic data (2.5 min of CPU time: a few minutes on 2 CPU cores)
#   make test   set up once (with torch), then run the test suite (what CI runs)
#   make test-fast  the tests not marked slow (tests/conftest.py says which are): the edit-test loop
# Setting up installs into $(VENV) once; it is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: help setup setup-test demo test test-fast clean-demo

help:  ## list the targets
	@echo "make demo        every stage on synthetic data into $(WORKDIR)/ (report.md, figures/); installs once"
	@echo "make test        the test suite (what CI runs); installs the test extras (torch included) once"
	@echo "make test-fast   the tests not marked slow (no trained workdir, no process, no whole-model compile): the edit-test loop, 4 min"
	@echo "make setup       only install jsim into $(VENV)/ (make setup-test: with the test extras)"
	@echo "make clean-demo  remove $(WORKDIR)/ (the next make demo trains again)"
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) WORKDIR=$(WORKDIR)"

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jsim needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	@$(PIP_INSTALL) --upgrade pip

# pip's and setuptools' output goes to a log, shown only if the install fails.
$(VENV)/.installed: pyproject.toml | $(PY)
	@echo "installing jsim into $(VENV)/ (once; log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e . > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	@echo "installing the test extras into $(VENV)/ (pytest, ruff, torch, tensorboard; once; log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e '.[test,torch]' > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# After the run: where the demo's test images are, and jsim-predict commands to try on them.
demo: setup
	$(PY) -m jsim.main --config=configs/demo.py --workdir=$(WORKDIR)
	@$(PY) configs/demo.py $(WORKDIR)

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: setup-test
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=10

clean-demo:
	rm -rf $(WORKDIR)
