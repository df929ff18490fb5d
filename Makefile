# Two entry points: `make demo` (the main flow on the bundled sample) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# No network here but the package registries: no telemetry attempts.
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install system-packages tiny-model demo test test-quick lint sample blocks cluster label-studio clean

install: $(VENV)/.installed

# Debian packages the tests use: strace (a test checks each published file is fsynced before its rename),
# chromium (a headless browser loads the dashboard page of `vbf serve`), prometheus (a real server
# scrapes a running flow's metrics).
SYSTEM_PACKAGES := strace chromium prometheus
system-packages:
	@for tool in $(SYSTEM_PACKAGES); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then mkdir -p .cache; echo "installing$$missing with apt-get (log: .cache/apt.log)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } > .cache/apt.log 2>&1 \
	  || { tail -n 30 .cache/apt.log; exit 1; }; fi

# One pip call resolves everything (a second one that moves prefect breaks vLLM's pins).
# PyPI's torchvision, torchaudio and torchcodec are built against another torch and break
# `import transformers` / `import vllm` beside the CPU build; text models need none of them.
# pip's thousand lines go to a log (shown when it fails), so a first `make demo` fits on a screen.
$(VENV)/.installed: pyproject.toml
	@mkdir -p .cache
	@echo "installing the Python dependencies into $(VENV) (minutes the first time; log: .cache/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@{ $(BIN)/pip install --progress-bar off -e '.[cpu,dev,labelstudio]' \
	  && $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; } > .cache/install.log 2>&1 \
	  || { tail -n 30 .cache/install.log; exit 1; }
	@touch $@

tiny-model: install
	@$(BIN)/python scripts/build_tiny_model.py

demo: tiny-model
	PREFECT_HOME=$(CURDIR)/.cache/prefect $(BIN)/vbf run

# Lint and format check first (seconds), then every test, in one process: two (`pytest -n 2 --dist loadfile
# --no-loadscope-reorder`, each process's engines on a core of their own, tests/conftest.py) took as long here
# (24-27 min) and made timed fault tests flaky on the loaded machine.
test: tiny-model system-packages lint
	$(BIN)/python -m pytest

test-quick: tiny-model system-packages lint
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Register the block types with the Prefect server of PREFECT_API_URL and save the default blocks
# that prefect.yaml's deployments name (`tiny-cpu`, `local-results`).
blocks: tiny-model
	$(BIN)/prefect block register -m blocks
	$(BIN)/vbf cluster --blocks-only

# The whole system on this machine: server, pools gpu and cpu, workers, blocks, deployments (Ctrl-C stops it).
cluster: tiny-model
	$(BIN)/vbf cluster

sample: install
	$(BIN)/python datasets/sample/make_sample.py

# A local Label Studio on 127.0.0.1:8080 for the curation flows, in its own virtualenv under .cache/
# (its pins conflict with Prefect's). The tests start their own throwaway server the same way.
label-studio: install
	$(BIN)/python scripts/label_studio_server.py serve --port 8080

clean:
	rm -rf results .cache
