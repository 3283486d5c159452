# The two set-up commands of the README: `make serve` and `make test`. Both create .venv if absent and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 0.0.0.0
PORT ?= 8000
# torch/torchvision pinned to the releases this project is tested with (served from local disk on our build hosts)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install serve serve-ray test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/dhrclip serve --host $(HOST) --port $(PORT)

# Ray Serve on this machine (a local Ray cluster is started when none runs): the same app, DHR_RAY_* replicas.
# Shared storage for several replicas: DHR_DATABASE_URL=postgresql+psycopg://... and DHR_ARTEFACT_URL=s3://...
serve-ray: $(STAMP)
	$(VENV)/bin/serve run deploy/ray/serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench

clean:
	rm -rf $(VENV) .pytest_cache
