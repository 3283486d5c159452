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

# Ray Serve on this machine: a Ray cluster that lives as long as the command (Ctrl-C stops both), its HTTP proxy on
# HOST:PORT, the same DHR_* settings as `make serve`, one replica unless DHR_RAY_MAX_REPLICAS says more (several
# replicas share storage: DHR_DATABASE_URL=postgresql+psycopg://... and DHR_ARTEFACT_URL=s3://...).
# Onto a running cluster instead: serve deploy deploy/ray/serve_config.yaml
serve-ray: $(STAMP)
	DHR_RAY_MAX_REPLICAS=$${DHR_RAY_MAX_REPLICAS:-1} $(PY) -m service.deploy.ray_serve --address local \
		--host $(HOST) --port $(PORT) --block

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench

clean:
	rm -rf $(VENV) .pytest_cache
