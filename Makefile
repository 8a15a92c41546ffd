# One command each: `make demo` sets up and runs the pipeline on generated data,
# `make test` sets up and runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EVENTS ?= 100000
DELTA_ARTIFACT := io.delta:delta-spark_4.2_2.13:4.4.0

.PHONY: setup demo test test-fast retail bench jars clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/sparkrec generate --events $(EVENTS) --seed 42 --out data/generated
	$(BIN)/sparkrec run --config conf/local.yaml

retail: setup
	$(BIN)/sparkrec run --config conf/online_retail.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not realdata"

bench: setup
	$(BIN)/python bench/bench_pipeline.py

# Only needed where Spark's own resolver cannot reach Maven Central but Maven can:
# fills ~/.m2/repository, which Spark's package resolution also searches.
jars:
	mvn -q dependency:get -Dartifact=$(DELTA_ARTIFACT)

clean:
	rm -rf warehouse data/generated bench/out .pytest_cache
