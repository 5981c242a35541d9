# The two front-door commands (README.md):
#   make demo   set up, then run every stage on the embedded synthetic data (a few minutes on 2 CPU cores)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup setup-test demo test clean-demo

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jsim needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -m pip install -q -e .

setup-test: $(PY)
	$(PY) -m pip install -q -e '.[test,torch]'

demo: setup
	$(PY) -m jsim.main --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --durations=15

clean-demo:
	rm -rf $(WORKDIR)
