# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SETUP  := $(VENV)/.setup-done
TINY   := artifacts/tiny-qwen2vl/config.json

.PHONY: setup demo test test-fast test-paper lint format tiny clean

setup: $(SETUP)

$(SETUP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip uninstall --quiet --yes hydra-optuna-sweeper  # replaced by stamp's own sweeper (optuna 5)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(SETUP)

# Rebuilt when its recipe changes (the tokenizer is trained on the synthetic corpus).
$(TINY): src/stamp/model/tiny.py src/stamp/data/synthetic.py | $(SETUP)
	$(BIN)/stamp-make-tiny --force

tiny: $(TINY)

# export_marker: the model stamp-demo and notebooks/quickstart.ipynb load (later runs leave it alone)
demo: $(SETUP) $(TINY)
	$(BIN)/stamp-train experiment=demo 'export_marker=$${paths.log_dir}/demo/make-demo-model.txt'

test: $(SETUP)
	$(BIN)/python -m pytest

test-fast: $(SETUP)
	$(BIN)/python -m pytest -m "not slow and not paper"

# the paper experiments at their real widths (tests/test_paper_shapes.py): ~1 h and ~12 GB on 2 cores
test-paper: $(SETUP)
	$(BIN)/python -m pytest -m paper -s

lint: $(SETUP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(SETUP)
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

clean:
	rm -rf logs outputs multirun .pytest_cache
