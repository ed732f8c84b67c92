# dft_ds: the two commands of the README, and the steps under them.
#   make run    create .venv, install, train the embedded default on 2 local ranks (ZeRO-3)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
NPROC  ?= 2
OUT    ?= runs/tiny-$(shell date +%Y%m%d-%H%M%S)
BIN    := $(VENV)/bin

.PHONY: venv run test test-fast test-slurm replicate docs clean

venv: $(VENV)/.installed

# torch is installed only when none is importable: a user's CUDA build (system site-packages) is
# reused as is; a bare machine gets the CPU build torch==2.13.0.
$(VENV)/.installed: setup.py
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: venv
	$(BIN)/deepspeed --num_gpus $(NPROC) --module dft_ds.train train.output_dir=$(OUT)
	@echo "results: $(OUT) (metrics.jsonl, tensorboard/, checkpoints/, config.yaml, summary.json)"

test: venv
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: venv
	$(BIN)/python -m pytest tests/unit -q -m "not slow"

test-slurm: venv
	$(BIN)/python -m pytest tests/slurm -q -ra

replicate: venv
	$(BIN)/python benchmarks/replicate.py --out runs/replicate-$(shell date +%Y%m%d-%H%M%S) --pretrain-epochs 2

docs: venv
	$(BIN)/python -m dft_ds.config --markdown > docs/configuration.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
