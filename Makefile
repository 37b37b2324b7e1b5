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

# ---------------------------------------------------------------------------------------------
# the shipped teaching model, trained from scratch on this repo's offline photos (CPU, 2 threads)
PHOTOS := photos
RUN := runs
TRAIN := $(BIN)/python train.py --config tiny --data $(PHOTOS)/train --val-data $(PHOTOS)/test --quiet

$(PHOTOS)/train: $(VENV)/.dev
	$(BIN)/python data.py --export-photos $(PHOTOS)

tiny-model: $(PHOTOS)/train
	mkdir -p $(RUN)
	$(TRAIN) --stage vae --steps 4000 --lr 3e-4 --out $(RUN)/vae.pt
	$(TRAIN) --scale 2 --vae $(RUN)/vae.pt --steps 2000 --out $(RUN)/x2.pt
	$(TRAIN) --scale 4 --teacher $(RUN)/x2.pt --steps 2000 --out $(RUN)/x4.pt
	$(TRAIN) --stage decoder --unet $(RUN)/x4.pt --steps 1000 --lr 1e-4 --out $(RUN)/x4_dec.pt
	cp $(RUN)/x4_dec.pt assets/yonos_tiny_x4.pt

.PHONY: tiny-model
