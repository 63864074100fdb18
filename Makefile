# `make test` on a fresh machine: creates .venv, installs the package with its test extra, runs the suite.
# torch is pinned through constraints.txt (the local CPU build) so pip never resolves a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
JOBS ?= 2  # pytest-xdist workers: a cold run is dominated by one-off graph compiles, spread over the cores

.PHONY: install test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(JOBS)

bench: install
	$(PIP) install -c constraints.txt -e '.[test,bench]'
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
