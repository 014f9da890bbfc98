# One virtual environment, built from nothing by `make venv`; every other target uses it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export GIT_PYTHON_REFRESH = quiet

.PHONY: venv generate lock browser java test test-slow test-all demo bench clean file-list tracking-server tracking-server-stop ui-screenshots

# The venv installs exactly requirements.lock (then the project itself, without dependencies); it refuses to
# start when pyproject.toml and the lock disagree, naming each difference and the command that refreshes it.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $$(grep '^packaging==' requirements.lock)
	$(BIN)/python -m bincounter.lock check
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# MLproject and docs/parameters.md are generated from the step parsers (steps/<entry point>.py, steps/options.py):
# run this after adding or changing a parameter; tests/test_project.py and tests/test_docs.py fail until you do.
generate: venv      ## write MLproject and docs/parameters.md from the step parsers
	$(BIN)/python scripts/gen_docs.py

requirements.lock:
	@echo "requirements.lock is missing: write it with 'make lock'" >&2; exit 1

# The lock: pip-compile (in its own small venv, .lock-venv) resolves pyproject.toml with every extra, keeping
# the pins it already has where they still fit; `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest.
LOCK_FLAGS ?=
lock:               ## refresh requirements.lock from pyproject.toml (after changing a dependency)
	test -x .lock-venv/bin/pip-compile || { $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip \
	  && .lock-venv/bin/pip install -q pip-tools==7.7.0; }
	.lock-venv/bin/pip-compile -q --all-extras --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_FLAGS) \
	  -o requirements.lock pyproject.toml

# The fast suite on TEST_WORKERS pytest-xdist workers (a test file stays on one worker: its module fixtures are
# made once); it prints its wall time, to compare with the one the README states.
TEST_WORKERS ?= 2
test: venv          ## the test suite without the slow tests (what CI runs first)
	@start=$$(date +%s); PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile; \
	rc=$$?; echo "make test: pytest took $$(( $$(date +%s) - start )) s on $(TEST_WORKERS) workers (exit $$rc)"; exit $$rc

# Debian's chromium + chromium-driver for the browser test (tests/test_ui.py; a browser that downloads itself
# fails offline). Installed with apt-get when missing; where that is impossible the test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium chromium-driver >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
	  || echo "make browser: could not install chromium chromium-driver; the UI test will skip"; \
	elif sudo -n true 2>/dev/null; then sudo -n apt-get install -y -q chromium chromium-driver >/dev/null \
	  || echo "make browser: could not install chromium chromium-driver; the UI test will skip"; \
	else echo "make browser: not root and no sudo: chromium chromium-driver not installed; the UI test will skip"; fi

# Debian's Java runtime for Spark (the score step and tests/test_score.py; pyspark brings no JVM). Installed
# with apt-get when missing; where that is impossible the Spark tests skip and say why.
java:
	@if command -v java >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q default-jre-headless >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q default-jre-headless >/dev/null; } \
	  || echo "make java: could not install default-jre-headless; the Spark tests will skip"; \
	elif sudo -n true 2>/dev/null; then sudo -n apt-get install -y -q default-jre-headless >/dev/null \
	  || echo "make java: could not install default-jre-headless; the Spark tests will skip"; \
	else echo "make java: not root and no sudo: default-jre-headless not installed; the Spark tests will skip"; fi

ui-screenshots: venv browser  ## the MLflow UI screenshots of docs/ui.md (docs/images/ui_*.png) from the browser test
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/ui_screenshots.py

test-slow: venv browser  ## only the slow tests (learning, random kills, tracking server, the UI in a browser)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m slow

test-all: venv browser  ## every test, slow ones included
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m ''

demo: venv          ## the whole pipeline on generated bins, offline
	PATH=$(CURDIR)/$(BIN):$$PATH ./scripts/demo.sh

file-list: venv     ## rebuild the committed file_list.json from the ABID label index
	PATH=$(CURDIR)/$(BIN):$$PATH mlflow run . -e select --env-manager local \
	  -P labels=../shared/abid-labels/expected_quantity.csv -P output=file_list.json

# What one GPU call carries (bench/gpu_sweep.py, docs/benchmarks.md "The GPU sweep"): the real sample and the
# wheels the GPU image lacks, in the ignored .gpu_sweep/; fails when the call would carry over 64 MiB.
GPU_SAMPLE ?= ../shared/abid-sample
.PHONY: gpu-bundle
gpu-bundle: venv    ## .gpu_sweep/: the real sample and the wheels a GPU sweep carries; prints the size that travels
	$(BIN)/python bench/gpu_sweep.py --bundle $(GPU_SAMPLE)
	du -sh --apparent-size .gpu_sweep/*

tracking-server: venv  ## mlflow server on 127.0.0.1:5000 over PostgreSQL (.tracking/); prints the URI to export
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/tracking_server.sh start .tracking 5000

tracking-server-stop:
	scripts/tracking_server.sh stop .tracking

clean:
	rm -rf mlruns mlflow.db data .pytest_cache
