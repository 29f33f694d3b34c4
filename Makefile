# Everything runs inside .venv, made here from pyproject.toml: nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test lint stubs bench bench-quick bench-compare bench-pool bench-ray bench-million bench-changes clean

$(STAMP): pyproject.toml setup.py heserve/he/_mac.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/heserve demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	npx -y @bufbuild/buf lint
	npx -y @bufbuild/buf breaking --against $$(ls -v proto/releases/heserve-v1-*.binpb | tail -n 1)

stubs: $(STAMP)
	$(BIN)/python scripts/gen_stubs.py

# Benchmarks (bench/): tables on stdout; JSON, pytest-benchmark JSON and a PNG in bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench.report run --tier full

bench-quick: $(STAMP)
	$(BIN)/python -m bench.report run --tier quick

# The process pool with 2 workers against 1 (and the in-process engine), called in turn (d = 128, 65,536 items).
bench-pool: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m bench.pool_bench

# Local process pool against Ray on this machine (d = 128, 65,536 items): ratio, restart, key shipping.
bench-ray: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m bench.ray_bench

# 1,000,000 × 128 over gRPC, server (2 workers) in a subprocess: ~1 min, ~5.6 GB server + 1.1 GB client; PRESET=fast|precise|compact
bench-million: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m bench.million --preset $(or $(PRESET),precise) --workers $(or $(WORKERS),2)

# Catalog changes while serving, 1,000,000 × 128 on 2 workers: updates of 1,000 items (appended, clustered, scattered, deleted) and a full reload; time until served, chunks encoded, memory (~3 min, ~7 GB)
bench-changes: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m bench.catalog_changes --items $(or $(ITEMS),1000000) --workers $(or $(WORKERS),2)

# BASELINE=path.json (default: the committed quick-tier baseline); CURRENT= (default: latest run)
bench-compare: $(STAMP)
	$(BIN)/python -m bench.report compare $(CURRENT) --baseline $(or $(BASELINE),bench/baselines/quick.json) --threshold $(or $(THRESHOLD),0.25) --mode $(or $(MODE),ratio)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
