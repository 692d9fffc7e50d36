# l2lab: `make sweep` runs the default lambda sweep, `make test` the test suite, `make ui` the
# MLflow UI. Each bootstraps .venv first (re-installed when pyproject.toml is newer).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STORE  := sqlite:///$(CURDIR)/mlruns/mlflow.db
PORT   ?= 5000

.PHONY: venv sweep test ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

sweep: $(STAMP)
	$(BIN)/python -m l2lab.train -m experiment=lambda_sweep $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-$(STORE)}" \
		--host 127.0.0.1 --port $(PORT)

bench: $(STAMP)
	$(BIN)/python -m l2lab.bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs multirun reports .pytest_cache
