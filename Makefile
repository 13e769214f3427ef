# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: install test demo bench bench-peers clean

install: $(STAMP)

# torch first (pinned, from the local wheel store), then the project, then deepspeed, whose
# build imports torch and therefore needs --no-build-isolation.
$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-build-isolation deepspeed
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/demo --out demo_output

bench: install
	$(PY) -m pytest -q bench --benchmark-only

# memdiff side by side with diffusers, Opacus and Wen's loop (bench/peers.py); the peers are the
# `bench` extra, kept out of the main install. PEERS_ARGS=--quick for the under-5-minute run.
bench-peers: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/peers.py $(PEERS_ARGS)

clean:
	rm -rf demo_output runs .pytest_cache .benchmarks
