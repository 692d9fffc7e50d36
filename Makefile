# l2lab: `make sweep` runs the default lambda sweep, `make test` the test suite, `make ui` the
# MLflow UI. Each bootstraps .venv first (re-installed when pyproject.toml is newer): `make sweep`
# with what a CPU user needs (".[dev]": no Ray, submitit, Optuna or PostgreSQL driver), `make test`
# with every extra (".[dev,all]") so that every test runs; each install has its own stamp, so
# `make test` after `make sweep` adds the rest. Both install the exact versions of
# requirements.lock (pip-tools; `make lock` refreshes it from pyproject.toml's ranges).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STAMP_ALL := $(VENV)/.installed-all
STORE  := sqlite:///$(CURDIR)/mlruns/mlflow.db
LOCK   := requirements.lock
# this machine's own pip caps (pip config global.constraint), so that the lock installs here too
LOCK_CAPS := $(shell $(PYTHON) -m pip config list 2>/dev/null | \
	sed -n "s/^global\.constraint='\(.*\)'$$/\1/p") $(PIP_CONSTRAINT)
PORT   ?= 5000

.PHONY: venv sweep test ui bench lint clean lock check-lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]" -c $(LOCK)
	touch $(STAMP)

$(STAMP_ALL): $(STAMP)
	$(BIN)/python -m pip install -e ".[dev,all]" -c $(LOCK)
	touch $(STAMP_ALL)

# The lock: every package of every extra at one exact version (a constraints file, so `make
# sweep` still installs only what it needs). Refresh after changing pyproject.toml's ranges, or to
# take newer releases; commit the result. CI checks that it matches pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip install -q "pip-tools>=7.4"
	$(BIN)/pip-compile --quiet --strip-extras --extra dev --extra all --unsafe-package l2lab \
		--no-emit-index-url --no-emit-find-links $(addprefix -c ,$(LOCK_CAPS)) \
		-o $(LOCK) pyproject.toml

check-lock: $(STAMP)
	$(BIN)/python scripts/check_lock.py

venv: $(STAMP)

sweep: $(STAMP)
	$(BIN)/python -m l2lab.train -m experiment=lambda_sweep $(ARGS)

# -n auto: one xdist worker per core; --dist loadscope: a module's tests (and its module-scoped
# fixtures: one shared sweep, one server) stay on one worker. ARGS='-m "not slow"' skips the few
# end-to-end tests for a quick local run; CI runs everything.
test: $(STAMP_ALL)
	$(BIN)/python -m pytest -n auto --dist loadscope --durations=25 $(ARGS)

# Prints the link to the latest experiment's runs in the training view, then serves the UI.
ui: $(STAMP)
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-$(STORE)}" \
		$(BIN)/python -m l2lab.tracking.ui --base http://127.0.0.1:$(PORT)
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-$(STORE)}" \
		--host 127.0.0.1 --port $(PORT)

bench: $(STAMP)
	$(BIN)/python -m l2lab.bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs multirun reports .pytest_cache
