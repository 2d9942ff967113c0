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

# Each lesson that finishes leaves a stamp, runs/.done/lesson-N. A lesson depends on the stamps of
# the lessons it reads from, so `make lesson-9` first runs whatever it builds on that has not
# finished, and `make all` run again skips everything done. A lesson cut short (Ctrl-C, a crash)
# leaves no stamp, so the next make runs it again: its half-written run is never taken for a
# finished one (add ARGS=--resume to continue a training lesson instead of restarting it).
DONE := runs/.done
done = $(DONE)/lesson-$(1)
# lesson 5's fine-tuned model: the reward model, DPO, GRPO and PPO (lessons 8-11) start from it,
# and `make all` exports it to the Hugging Face format
SFT  := runs/sft/full/default/checkpoints/ckpt_best.pth
EXPORT_DIR := runs/export/sft-full
# what `make all` passes to the lessons that would otherwise wait for you: one chat answer, and a
# serving self-check (start the server, concurrent clients over HTTP, the numbers, stop)
ALL_ARGS_13 := --prompt 'Write a short story about a cat.'
ALL_ARGS_14 := --self_check

.PHONY: help setup all test bench clean export $(addprefix lesson-,0 1 2 3 4 5 6 7 8 9 10 11 12 13 14)

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install nano with its dependencies

# pip writes no cache (a download is not kept twice on a small disk) and byte-compiles nothing,
# because it does that on one core: compileall does it on every core, in half the time here (34 s
# for the whole set-up against 50 s). A file it cannot compile (torch ships a few Python 3.12-only
# test helpers) is skipped, as Python would skip it at import.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-compile
$(VENV)/.installed: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test]"
	@$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $@

# lesson N runs lessons/NN_*.py, says how long it took, and stamps it done; a lesson whose script
# does not exist yet says so and fails
run_lesson = script=$$(ls lessons/$$(printf %02d $(1))_*.py 2>/dev/null | head -1); \
	if [ -z "$$script" ]; then echo "lesson $(1) is not built yet (no lessons/$$(printf %02d $(1))_*.py)"; exit 1; fi; \
	echo "==> $$script $(2)"; start=$$(date +%s); $(PY) $$script $(2) && \
	mkdir -p $(DONE) && touch $(call done,$(1)) && echo "<== lesson $(1) took $$(( $$(date +%s) - start )) s"

# what each lesson reads from (the rule below runs a lesson whose stamp is missing or older)
$(call done,0) $(call done,3): | setup
$(call done,1): $(call done,0)
$(call done,2): $(call done,1)
$(call done,4): $(call done,2)
$(call done,5) $(call done,6) $(call done,7) $(call done,12) $(call done,13) $(call done,14): $(call done,4)
$(call done,8) $(call done,9) $(call done,10) $(call done,11): $(call done,5)
# beside another lesson (make all's ONE_CORE=1), a lesson runs on one core with its output in
# runs/logs/lesson-N.log, printed whole when it finishes: two lessons' progress bars would
# otherwise overwrite each other. `tail -f` the log to watch it live; it stays there afterwards.
run_beside = export OMP_NUM_THREADS=1; mkdir -p runs/logs; log=runs/logs/lesson-$(1).log; \
	echo "==> lesson $(1) started on one core (live: tail -f $$log)"; \
	( $(call run_lesson,$(1),$(2)) ) > $$log 2>&1; status=$$?; cat $$log; exit $$status
$(DONE)/lesson-%:
	@$(if $(ONE_CORE),$(call run_beside,$*,$(ALL_ARGS_$*)),$(call run_lesson,$*,$(ALL_ARGS_$*)))

lesson-0: setup ## data: the built-in corpus (or --source tinystories) into data/raw/
	@$(call run_lesson,0,$(ARGS))
lesson-1: $(call done,0) ## tokenizer: train byte-level BPE into data/tokenizer/
	@$(call run_lesson,1,$(ARGS))
lesson-2: $(call done,1) ## bins: encode stories, conversations and preferences into data/bins/
	@$(call run_lesson,2,$(ARGS))
lesson-3: setup ## the model: Gemma-2 Nano tour, MQA arithmetic, Triton kernel vs reference
	@$(call run_lesson,3,$(ARGS))
lesson-4: $(call done,2) ## pretraining into runs/pretrain/default/ (NPROC=2 for DDP)
	@if [ "$(NPROC)" -gt 1 ]; then $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) lessons/04_pretrain.py $(ARGS) \
		&& mkdir -p $(DONE) && touch $(call done,4); else $(call run_lesson,4,$(ARGS)); fi
lesson-5: $(call done,4) ## full supervised fine-tuning
	@$(call run_lesson,5,$(ARGS))
lesson-6: $(call done,4) ## LoRA fine-tuning
	@$(call run_lesson,6,$(ARGS))
lesson-7: $(call done,4) ## QLoRA fine-tuning on our own NF4
	@$(call run_lesson,7,$(ARGS))
lesson-8: $(call done,5) ## reward model: a scalar head on the SFT model, Bradley-Terry loss
	@$(call run_lesson,8,$(ARGS))
lesson-9: $(call done,5) ## DPO on the preference pairs (and what the model now writes)
	@$(call run_lesson,9,$(ARGS))
lesson-10: $(call done,5) ## GRPO: group-normalised advantages, verifiable math reward
	@$(call run_lesson,10,$(ARGS))
lesson-11: $(call done,5) ## PPO: actor-critic, GAE, per-token KL
	@$(call run_lesson,11,$(ARGS))
lesson-12: $(call done,4) ## evaluation of every stage side by side
	@$(call run_lesson,12,$(ARGS))
lesson-13: $(call done,4) ## chat in the terminal (make lesson-13 ARGS='--prompt "Hi"' for one answer)
	@$(call run_lesson,13,$(ARGS))
lesson-14: $(call done,4) ## serving: paged KV cache, continuous batching, OpenAI-style API, chat page
	@$(call run_lesson,14,$(ARGS))

export_sft = echo "==> python -m nano.checkpoints.export --checkpoint_path $(SFT) --out_dir $(EXPORT_DIR) --force"; \
	$(PY) -m nano.checkpoints.export --checkpoint_path $(SFT) --out_dir $(EXPORT_DIR) --force && touch $(DONE)/export
export: $(call done,5) ## the fine-tuned model as a Hugging Face folder (runs/export/sft-full/)
	@$(export_sft)
$(DONE)/export: $(call done,5)
	@$(export_sft)

# every lesson on the CPU preset, then an export; lessons already done are skipped. Lessons 5-11 do
# not read each other's results (5, 6, 7 start from lesson 4's model; 8-11 from lesson 5's), so they
# run JOBS at a time, each on one core (a training step on one core costs 1.7x one on two, but the
# decoding parts use one core anyway), their output printed whole as each finishes. JOBS=1: one by one.
# make starts them in this order as cores free up: 5 first (8-11 wait for it), then the longest of
# those that wait for it (GRPO, PPO: ~190 and ~170 s) early, so that the two cores tend to finish
# close together (with one run's durations 25 s sooner than 5 6 7 8 9 10 11, with another's level).
JOBS ?= 2
BEFORE := 0 1 2 3 4
BESIDE := 5 6 7 10 8 11 9
AFTER  := 12 13 14
stamps = $(foreach n,$(1),$(call done,$(n)))
all: setup ## every lesson on the CPU preset, 5-11 two at a time (JOBS=1: one by one; skips what is done)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(call stamps,$(BEFORE)) && \
	if [ "$(JOBS)" -gt 1 ]; then echo "==> lessons $(BESIDE) and the export, $(JOBS) at a time on one core each; each one's output appears when it finishes"; fi && \
	$(MAKE) --no-print-directory -j$(JOBS) $(if $(filter-out 1,$(JOBS)),ONE_CORE=1) $(call stamps,$(BESIDE)) $(DONE)/export && \
	$(MAKE) --no-print-directory $(call stamps,$(AFTER)) && \
	took=$$(( $$(date +%s) - start )) && \
	echo "make all: every lesson is done (runs/.done/) in $$((took / 60)) min $$((took % 60)) s; rerun one with make lesson-N, or start over with make clean"

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
	rm -rf data/raw data/tokenizer data/bins data/fast-dev-run runs
