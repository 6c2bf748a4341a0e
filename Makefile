# Every install path resolves torch to 2.13.0 through constraints.txt (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_PKG := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data train test lint

# train: on a machine without a GPU, the CPU config (accelerate otherwise runs one CPU thread per process).

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"

data:
	@test -f $(DATA_PKG) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; }

train: setup data
	$(VENV)/bin/accelerate launch $$(command -v nvidia-smi >/dev/null || echo --config_file recipes/accelerate_configs/cpu.yaml) recipes/train.py

test: setup data
	$(VENV)/bin/ruff check src tests recipes benchmarks
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests recipes benchmarks
