# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= digits
# a developer's layout: the CIFAR-10 archive beside the checkout (the library reads only the variable)
GUARD_CIFAR10_ARCHIVE ?= $(abspath ../shared/data/cifar10-jpg.tar.gz)
export GUARD_CIFAR10_ARCHIVE

.PHONY: demo test bench bench-full install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist worksteal

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# quick suite (about 30 minutes on 2 CPU cores, two pinned single-thread processes): every detector on the
# same checkpoint of each cell, and whole runs with and without the guard for its cost
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_peers.py

# full suite (hours on a CPU): whole training runs with and without the guard, scaling, distributed
bench-full: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_peers.py --suite full
	$(BIN)/python benchmarks/bench_guard.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
