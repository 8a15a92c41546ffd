# One command each: `make demo` sets up and runs the pipeline on generated data,
# `make test` sets up and runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_VERSION := 3.3.2
SPARK_PROVIDER_VERSION := 6.3.4
BIN := $(VENV)/bin
EVENTS ?= 100000
DELTA_ARTIFACT := io.delta:delta-spark_4.2_2.13:4.4.0


.PHONY: system-libs serve bench-serve load-tools airflow-setup browser setup demo test lint test-unit test-fast test-cluster retail bench jars dist dist-env cluster-up cluster-down kafka-up kafka-down clean

setup: system-libs $(VENV)/.installed

# LightGBM's wheel (the ranker) links the system's OpenMP runtime, which a minimal Debian may lack.
system-libs:
	@ldconfig -p 2>/dev/null | grep -q 'libgomp.so.1 ' || [ -e /usr/lib/x86_64-linux-gnu/libgomp.so.1 ] || \
		{ echo "installing Debian's libgomp1 for LightGBM"; \
		  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq libgomp1 >/dev/null; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/sparkrec generate --events $(EVENTS) --seed 42 --out data/generated
	$(BIN)/sparkrec run --config conf/local.yaml

# The HTTP API over what `make demo` published (no JVM): http://127.0.0.1:8000/docs. Posted events go to
# data/live (JSON lines), where `sparkrec stream` with stream.source.kind=files would read them: no Kafka needed.
serve: setup
	$(BIN)/sparkrec serve --config conf/local.yaml --set stream.source.kind=files --set stream.source.path=data/live

retail: setup
	$(BIN)/sparkrec run --config conf/online_retail.yaml

# Three workers (pytest-xdist), one test file each at a time: most of the suite waits on processes it
# started (spark-submit, Airflow, a cluster, a broker, a server), so three files overlap on 2 cores
# (0.88x the time of two on 2026-12-06: 42 min 37 s against 48 min 31 s). Files go out in collection order,
# which tests/conftest.py sorts heaviest first (xdist's default would sort them by their number of tests).
test: setup airflow-setup browser lint
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder

# The layer contracts in pyproject.toml (import-linter): the core without Spark, no upward import.
lint: setup
	$(BIN)/lint-imports

# Headless Chromium for the report test, and its driver for the shop page test (Debian's packages; needs root or
# sudo the first time).
browser:
	@{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } && \
		command -v chromedriver >/dev/null 2>&1 || \
		{ echo "installing Debian's chromium and chromium-driver for the browser tests"; \
		  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Airflow in a virtual environment of its own (its pins clash with ours); the DAG tests drive it.
# pyspark is pinned to ours so the provider does not pull a second, newer Spark.
airflow-setup: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install -q "apache-airflow==$(AIRFLOW_VERSION)" \
		"apache-airflow-providers-apache-spark==$(SPARK_PROVIDER_VERSION)" "pyspark==4.2.0"
	touch $@

# The no-JVM tier: config, the top-k kernel, the ledger, the gate, the stage table (seconds).
test-unit: setup lint
	$(BIN)/python -m pytest -m nojvm

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not realdata and not cluster"

test-cluster: setup
	$(BIN)/python -m pytest -m cluster

# What a cluster needs: dist/sparkrec-<version>-py3-none-any.whl and dist/sparkrec-<version>.zip (--py-files).
dist: setup
	$(BIN)/python scripts/build_dist.py

# A packed virtual environment (sparkrec and every dependency) for `--archives dist/sparkrec-env.tar.gz#environment`.
dist-env: dist
	rm -rf build/env && $(PYTHON) -m venv build/env
	build/env/bin/pip install -q dist/sparkrec-*.whl venv-pack
	build/env/bin/venv-pack -p build/env -o dist/sparkrec-env.tar.gz --force

# A standalone cluster on localhost (a master and two 1-core workers); prints the master URL.
cluster-up: setup
	$(BIN)/python -m sparkrec.dev.cluster start --dir build/cluster

cluster-down:
	$(BIN)/python -m sparkrec.dev.cluster stop --dir build/cluster

# A Kafka broker (KRaft, 127.0.0.1 only) from Apache Kafka's jars on Maven Central, for the live stream.
kafka-up: setup
	$(BIN)/python -m sparkrec.dev.kafka up --dir build/kafka

kafka-down:
	$(BIN)/python -m sparkrec.dev.kafka down --dir build/kafka

bench: setup
	$(BIN)/python bench/bench_pipeline.py

# HTTP load generators for bench/bench_serve.py (Debian's packages; needs root or sudo the first time).
load-tools:
	@command -v wrk >/dev/null 2>&1 && command -v hey >/dev/null 2>&1 || \
		{ echo "installing Debian's wrk and hey for bench/bench_serve.py"; \
		  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq wrk hey >/dev/null; }
	@command -v vegeta >/dev/null 2>&1 || test -x $$HOME/go/bin/vegeta || \
		{ echo "installing vegeta (open loop at a constant rate) from the Go module proxy"; \
		  go install github.com/tsenart/vegeta/v12@v12.13.0; }

bench-serve: setup load-tools
	$(BIN)/python bench/bench_serve.py

# Only needed where Spark's own resolver cannot reach Maven Central but Maven can:
# fills ~/.m2/repository, which Spark's package resolution also searches.
jars:
	mvn -q dependency:get -Dartifact=$(DELTA_ARTIFACT)

clean:
	rm -rf warehouse data/generated bench/out .pytest_cache dist build
