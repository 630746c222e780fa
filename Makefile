# Everything a fresh machine needs, then the job. `make run` is the main job, `make test` the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned to the CPU build that pip finds locally; an open range would pull a CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-dev data run test lint

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'

# Fashion-MNIST ships as a Debian package; skipped quietly where apt is not ours to use.
data:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

run: install
	fedrir run

test: install-dev data
	$(PYTHON) -m pytest -q

lint: install-dev
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	mypy
