# rpcframe developer tasks. Every target does its own setup on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
PYTEST_ARGS ?=

.PHONY: setup system protos check-generated lint test test-fast demo bench bench-quick bench-micro reliability reliability-quick clean

setup: $(STAMP) $(NPM_STAMP) system

# Real servers the tests start: Prometheus and nats-server from Debian's packages (as root,
# as CI runs); without it the one test that needs it skips and says why.
system:
	@if ! command -v prometheus >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -q prometheus >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q prometheus >/dev/null 2>&1; } || true; \
		fi; \
		command -v prometheus >/dev/null 2>&1 || \
			echo "prometheus not installed: tests/integration/test_prometheus.py skips its real-Prometheus test"; \
	fi
	@sh scripts/install-nats-server.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat  # a path mypy sees
	touch $@

# Third-party interop peers (buf CLI) from npm, pinned by package-lock.json.
$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

protos: $(STAMP)
	$(PY) -m rpcframe codegen protos -o generated

# Fails when generated/ differs from what the protos produce now.
check-generated: $(STAMP)
	@rm -rf .cache/generated-check && mkdir -p .cache
	@$(PY) -m rpcframe codegen protos -o .cache/generated-check -q
	@diff -r -x __pycache__ -x py.typed generated .cache/generated-check \
		|| { echo "generated/ is stale: run 'make protos' and commit"; exit 1; }
	@echo "generated/ is up to date"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup check-generated lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Tests only, without the generated-code and lint gates.
test-fast: setup
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

demo: $(STAMP)
	@sh scripts/install-nats-server.sh  # the events act's broker (skipped, with a note, without it)
	$(PY) -m examples.demo

bench: setup
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.balancing
	$(PY) -m benchmarks.security
	$(PY) -m benchmarks.retries
	$(PY) -m benchmarks.observability
	$(PY) -m benchmarks.overload
	$(PY) -m benchmarks.refusal
	$(PY) -m benchmarks.limiters
	$(PY) -m benchmarks.workers
	$(PY) -m benchmarks.compression
	$(PY) -m benchmarks.instructions  # needs valgrind; says so and skips without it
	$(PY) -m benchmarks.bytecodes
	$(PY) -m benchmarks.events

bench-quick: setup
	$(PY) -m benchmarks.run --quick
	$(PY) -m benchmarks.balancing --quick
	$(PY) -m benchmarks.security --quick
	$(PY) -m benchmarks.retries --quick
	$(PY) -m benchmarks.observability --quick
	$(PY) -m benchmarks.overload --quick
	$(PY) -m benchmarks.refusal --quick
	$(PY) -m benchmarks.limiters
	$(PY) -m benchmarks.workers --quick
	$(PY) -m benchmarks.compression --quick
	$(PY) -m benchmarks.events --quick

# Faults, hostile clients and a soak, rpcframe next to raw grpcio (benchmarks/results/reliability.md);
# exits 1 when an acceptance check fails. The quick form (~3 min) is the CI one.
reliability: setup
	$(PY) -m benchmarks.reliability

reliability-quick: setup
	$(PY) -m benchmarks.reliability --quick

# pytest-benchmark micro-benchmarks of hot-path pieces (not part of make test).
bench-micro: setup
	$(PY) -m pytest benchmarks/micro --benchmark-only -q

clean:
	rm -rf $(VENV) node_modules .cache .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
