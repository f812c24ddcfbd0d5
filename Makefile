# Two commands: `make train` and `make test`. Each creates .venv when missing and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; override for GPUs, e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
# (An unpinned torch resolves to a multi-GB CUDA build.)
TORCH ?= torch==2.13.0
# pytest-xdist workers: the tests use one torch thread each, so one worker per core (`make test TEST_JOBS=0`: serial)
TEST_JOBS ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup test train bench bench-quick wheel clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal

train: $(STAMP)
	$(VENV)/bin/equireann-train experiment=quick

bench: $(STAMP)
	$(VENV)/bin/equireann-bench

# speed table + 1.5-CPU-minute accuracy table on rMD17 aspirin, < 10 minutes on 2 cores
bench-quick: $(STAMP)
	$(VENV)/bin/equireann-bench bench=quick

# dist/pyg_equireann-<version>-py3-none-any.whl: the package with its configs (no data, no tests)
wheel: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
