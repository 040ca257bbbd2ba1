# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job on its embedded default
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_PLATFORMS ?= cpu

.PHONY: demo test setup clean

$(BIN)/vist2: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,torch]"
	touch $(BIN)/vist2

setup: $(BIN)/vist2

# The main job: the tiny preset trained through the four stages on the embedded corpus.
demo: setup
	$(BIN)/vist2 demo --workdir runs/demo

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
