# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job on its embedded default
#   make test   set up .venv (with the PyTorch reference and libtpu for AOT TPU compiles)
#               and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_PLATFORMS ?= cpu

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,torch]"
	touch $@

$(VENV)/.installed-tpu: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,torch,tpu]"
	touch $@

setup: $(VENV)/.installed

# The main job: the tiny preset trained through the four stages on the embedded corpus.
demo: setup
	$(BIN)/vist2 demo --workdir runs/demo

test: $(VENV)/.installed-tpu
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=25

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
