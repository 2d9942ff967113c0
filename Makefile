# nano — the whole life of a small LLM. `make help` lists the targets.
# Every target depends on `setup`, which makes the virtual environment on first use, so
# `make all` and `make test` work from a fresh clone with nothing installed by hand.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
# torch first, pinned: here that is a CPU wheel (see README "Hardware"); on a GPU machine run
# `make setup TORCH_SPEC=torch` to let pip pick the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# extra flags for one lesson: make lesson-4 ARGS="--steps 50"
ARGS       ?=
# processes for distributed pretraining: make lesson-4 NPROC=2
NPROC      ?= 1
# one test by name for check-N (pytest -k): make check-1 K=merge
K          ?=
# one function for exercise-N: make exercise-2 FN=sft_batch
FN         ?=

# outputs that later lessons read; Make builds a missing one with the lesson that makes it
RAW  := data/raw/manifest.json
TOK  := data/tokenizer/tokenizer.json
BINS := data/bins/meta.json
BASE := runs/pretrain/default/checkpoints/ckpt_best.pth
# lesson 5's fine-tuned model: where the reward model, DPO, GRPO and PPO (lessons 8-11) start
SFT  := runs/sft/full/default/checkpoints/ckpt_best.pth

.PHONY: help setup all test bench clean $(addprefix lesson-,0 1 2 3 4 5 6 7 8 9 10 11 12 13 14)

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install nano with its dependencies

$(VENV)/.installed: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $@

# lesson N runs lessons/NN_*.py; a lesson whose script does not exist yet says so and fails
run_lesson = script=$$(ls lessons/$$(printf %02d $(1))_*.py 2>/dev/null | head -1); \
	if [ -z "$$script" ]; then echo "lesson $(1) is not built yet (no lessons/$$(printf %02d $(1))_*.py)"; exit 1; fi; \
	echo "==> $$script $(2)"; $(PY) $$script $(2)

$(RAW): | setup
	@$(call run_lesson,0,)
$(TOK): $(RAW)
	@$(call run_lesson,1,)
$(BINS): $(TOK)
	@$(call run_lesson,2,)
$(BASE): $(BINS)
	@$(call run_lesson,4,)
$(SFT): $(BASE)
	@$(call run_lesson,5,)

lesson-0: setup ## data: the built-in corpus (or --source tinystories) into data/raw/
	@$(call run_lesson,0,$(ARGS))
lesson-1: $(RAW) ## tokenizer: train byte-level BPE into data/tokenizer/
	@$(call run_lesson,1,$(ARGS))
lesson-2: $(TOK) ## bins: encode stories, conversations and preferences into data/bins/
	@$(call run_lesson,2,$(ARGS))
lesson-3: setup ## the model: Gemma-2 Nano tour, MQA arithmetic, Triton kernel vs reference
	@$(call run_lesson,3,$(ARGS))
lesson-4: $(BINS) ## pretraining into runs/pretrain/default/ (NPROC=2 for DDP)
	@if [ "$(NPROC)" -gt 1 ]; then $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) lessons/04_pretrain.py $(ARGS); \
	else $(call run_lesson,4,$(ARGS)); fi
lesson-5: $(BASE) ## full supervised fine-tuning
	@$(call run_lesson,5,$(ARGS))
lesson-6: $(BASE) ## LoRA fine-tuning
	@$(call run_lesson,6,$(ARGS))
lesson-7: $(BASE) ## QLoRA fine-tuning on our own NF4
	@$(call run_lesson,7,$(ARGS))
lesson-8: $(SFT) ## reward model
	@$(call run_lesson,8,$(ARGS))
lesson-9: $(SFT) ## DPO
	@$(call run_lesson,9,$(ARGS))
lesson-10: $(SFT) ## GRPO
	@$(call run_lesson,10,$(ARGS))
lesson-11: $(SFT) ## PPO
	@$(call run_lesson,11,$(ARGS))
lesson-12: $(BASE) ## evaluation of every stage side by side
	@$(call run_lesson,12,$(ARGS))
lesson-13: $(BASE) ## chat in the terminal (make lesson-13 ARGS='--prompt "Hi"' for one answer)
	@$(call run_lesson,13,$(ARGS))
lesson-14: $(BASE) ## serving: paged KV cache, continuous batching, OpenAI-style API
	@$(call run_lesson,14,$(ARGS))

all: setup ## run every lesson that exists so far, in order, on the CPU preset
	@for n in 0 1 2 3 4 5 6 7 8 9 10 11 12 13; do \
		script=$$(ls lessons/$$(printf %02d $$n)_*.py 2>/dev/null | head -1); \
		if [ -z "$$script" ]; then echo "==> lesson $$n is not built yet, skipped"; continue; fi; \
		args=""; if [ $$n = 13 ]; then args='--prompt "Write a short story about a cat."'; fi; \
		$(MAKE) --no-print-directory lesson-$$n ARGS="$$args" || exit 1; \
	done

test: setup ## run the whole test suite
	$(PY) -m pytest -q

# (not .PHONY: GNU make skips pattern rules for phony targets; no file is ever called check-N)
check-%: setup ## one lesson's tests: make check-1, or one test: make check-1 K=merge (pytest -k)
	@files=$$(ls tests/test_$$(printf %02d $*)_*.py 2>/dev/null); \
	if [ -z "$$files" ]; then echo "no tests for lesson $* yet (tests/test_$$(printf %02d $*)_*.py)"; exit 1; fi; \
	$(PY) -m pytest -v $$files $(if $(K),-k "$(K)")

exercise-%: setup ## a starting point for lesson N's module in exercises/ (FN=name: one function only)
	@$(PY) tests/make_exercise.py $* $(if $(FN),--only $(FN))

bench: setup ## speed benchmarks: tables measured side by side on this machine, then one summary table
	@for b in bench/bench_*.py; do echo "==> $$b"; $(PY) $$b || exit 1; done
	@echo "==> summary (runs/bench/results.jsonl)"; $(PY) bench/results.py

clean: ## remove generated data and runs (keeps .venv; `rm -rf .venv` for that)
	rm -rf data/raw data/tokenizer data/bins runs
