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

# Until `vist2 demo` (four-stage training) lands, the main job is `vist2 check`: one
# compiled forward+backward of the tiny VIST2 model on packed OLM rows, timed.
demo: setup
	$(BIN)/vist2 params --preset tiny
	$(BIN)/vist2 check --preset tiny

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
