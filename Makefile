# Everything the project needs is installed from here (pip + venv; torch comes from the package index).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/quickstart

.PHONY: install test quickstart bench clean

$(BIN)/facecore: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

install: $(BIN)/facecore

test: install
	$(BIN)/python -m pytest -q

# The main job: make synthetic identities, train on CPU, evaluate on held-out identities.
quickstart: install
	$(BIN)/facecore demo-data $(DATA) --pairs 2000
	$(BIN)/facecore train --config configs/quickstart.yaml
	$(BIN)/facecore eval --config configs/quickstart.yaml --checkpoint "$$(ls -t runs/quickstart/*/*/best.pth | head -n 1)"

bench: install
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf runs logs data .pytest_cache
