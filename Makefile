# Two entry points for a fresh machine with Python 3.11+ and make:
#   make serve   set up the service and serve the bundled models
#   make test    set up everything (service, training, dev tools) and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-full lint bench h2load browser podman nginx clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps re-run pip only when pyproject.toml changes.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[serve]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[serve,train,dev]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	CHARLSTM_HOST=$(HOST) CHARLSTM_PORT=$(PORT) $(BIN)/python -m app

# Debian's chromium for the playground test (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and cannot install it: the browser test will be skipped"; fi; }

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy

# Most tests wait on processes, sockets and TensorFlow, so the suite runs on PYTEST_WORKERS
# xdist workers; the few that assert times under load (marker `alone`) run after, by themselves.
PYTEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -q

test: $(VENV)/.dev browser h2load podman nginx lint
	$(PYTEST) -n $(PYTEST_WORKERS) --dist loadgroup -m "not alone"
	$(PYTEST) -m alone

# Longer fuzzing and the 2-minute soak (see docs/RELIABILITY.md).
test-full: $(VENV)/.dev browser h2load podman nginx lint
	CHARLSTM_FULL=1 $(PYTEST) -n $(PYTEST_WORKERS) --dist loadgroup -m "not alone"
	CHARLSTM_FULL=1 $(PYTEST) -m alone

# Debian's h2load (nghttp2-client) drives the servers in bench.serving.
h2load:
	@command -v h2load >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; \
	  else echo "h2load not found and cannot install it: bench.serving cannot run"; fi; }

# Debian's podman (with runc) and mmdebstrap: tests/test_container.py builds the cpu image on a
# Debian base made with mmdebstrap and runs it.
podman:
	@{ command -v podman && command -v runc && command -v mmdebstrap; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends podman runc mmdebstrap >/dev/null; \
	  else echo "podman, runc or mmdebstrap not found and cannot install them: the container tests will be skipped"; fi; }
# Debian's nginx for tests/test_replicas.py (two replicas behind a header-hash balancer). The
# test runs its own nginx on a free loopback port; a packaged service, where one is started,
# is left alone.
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
	      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; \
	  else echo "nginx not found and cannot install it: the multi-replica test will be skipped"; fi; }

bench: $(VENV)/.dev h2load
	$(BIN)/python -m bench.decode
	$(BIN)/python -m bench.serving

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis test-artifacts
