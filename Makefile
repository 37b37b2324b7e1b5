# make sample: super-resolve the example image with the shipped model; make test: run the test suite.
# Each target builds .venv (Python 3.10+) with what it needs the first time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt $(BIN)/activate
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt $(BIN)/activate
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

sample: $(VENV)/.runtime
	$(BIN)/python sample.py assets/example.png --out out/example_x4.png --force

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

.PHONY: sample test

# your own tiny model in about 15 minutes on 2 cores, into runs/tiny (README, "Your first hour")
tiny: $(VENV)/.dev
	bash tiny.sh runs/tiny

# the study and the shipped models from scratch (hours on 2 cores; see experiments.sh)
experiments: $(VENV)/.dev
	bash experiments.sh runs

.PHONY: tiny experiments
