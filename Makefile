# Everything runs inside .venv, made here from pyproject.toml: nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test lint stubs bench bench-quick bench-compare clean

$(STAMP): pyproject.toml
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
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	npx -y @bufbuild/buf lint

stubs: $(STAMP)
	$(BIN)/python scripts/gen_stubs.py

# Benchmarks (bench/): tables on stdout; JSON, pytest-benchmark JSON and a PNG in bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench.report run --tier full

bench-quick: $(STAMP)
	$(BIN)/python -m bench.report run --tier quick

# BASELINE=path.json (default: the committed quick-tier baseline); CURRENT= (default: latest run)
bench-compare: $(STAMP)
	$(BIN)/python -m bench.report compare $(CURRENT) --baseline $(or $(BASELINE),bench/baselines/quick.json) --threshold $(or $(THRESHOLD),0.25) --mode $(or $(MODE),ratio)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
