# `make demo` / `make test` on a fresh machine: create .venv, install the package with its test, demo and notebook
# extras, then run the demo (python -m lowbit_fn.demo) or the suite (tests, doctests, notebooks).
# torch is pinned through constraints.txt (the local CPU build) so pip never resolves a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
JOBS ?= 2  # pytest-xdist workers: a cold run is dominated by one-off graph compiles, spread over the cores

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test,demo,notebooks]'
	touch $(STAMP)

demo: install
	$(PY) -m lowbit_fn.demo $(ARGS)

test: install
	$(PY) -m pytest -q -n $(JOBS)

bench: install
	$(PIP) install -c constraints.txt -e '.[test,demo,notebooks,bench]'
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
