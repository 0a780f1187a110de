# Every target creates/uses a local virtualenv in .venv: a fresh clone needs nothing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv demo test mutate flakehunt bench lint system-deps bench-deps clean

all: test

# A regular (not editable) install, as users get from pip: an editable install's import
# hook costs every `bootcast fetch` ~25 ms of start-up, which eight clients starting at once
# on two cores feel. It is refreshed whenever a source file changes; the tests import the
# sources directly (pytest's pythonpath), so they never run a stale copy.
SOURCES := $(shell find bootcast boomscooter -name '*.py' -o -name '*.typed' 2>/dev/null)

$(STAMP): pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the multi-host tests and benchmarks use. Installed only when running as
# root and missing; otherwise those tests skip with a stated reason.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v nft >/dev/null || missing="$$missing nftables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

bench-deps: system-deps
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v udp-sender >/dev/null || missing="$$missing udpcast"; \
	  command -v uftp >/dev/null || missing="$$missing uftp"; \
	  command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v nats-server >/dev/null || missing="$$missing nats-server"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/boomscooter demo
	$(BIN)/bootcast demo

# pytest's exit code 5 (no tests collected) is a failure, never a pass.
test: $(STAMP) system-deps
	@$(BIN)/python -m pytest -p no:randomly $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

# The mutation check (scripts/mutate.py): each rule of the node removed in turn from a copy of
# the repository; the simulation and the node's unit tests must fail for each. CI runs it.
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py

# The flaky-test hunt (scripts/flakehunt.py): the whole suite RUNS times, shuffled, beside busy
# loops on every core (LOAD=normal|low|mixed|none); a summary by test in .flakehunt/report.md.
RUNS ?= 10
LOAD ?= normal
flakehunt: $(STAMP) system-deps
	$(BIN)/python scripts/flakehunt.py --runs $(RUNS) --load $(LOAD) -- $(PYTEST_ARGS)

bench: $(STAMP) bench-deps
	$(BIN)/python -m bench.files_bench --http-loss skip
	$(BIN)/python -m bench.files_floor
	$(BIN)/python -m bench.loopback_bench
	$(BIN)/python -m bench.storage_bench
	$(BIN)/python -m bench.log_bench
	$(BIN)/python -m bench.log_producer
	$(BIN)/python -m bench.replication_bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check bootcast boomscooter tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
