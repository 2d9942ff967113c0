"""
Lesson 12: the final exam. Every stage trained so far answers the same held-out math problems, every
chat stage writes stories that must use given words (the words skill, nano/eval/words_skill.py), the
stories each one samples are checked for whether they keep their characters (nano/eval/coherence.py),
and each is scored on the same held-out stories, side by side in one table.

    make lesson-12                                   # every stage that exists (a few CPU minutes)
    python lessons/12_evaluate.py --tasks tinymath,words --limit 50
    python lessons/12_evaluate.py --checkpoint_path runs/sft/full/default/checkpoints/ckpt_best.pth \\
        --tasks gsm8k --limit 20                     # one checkpoint (needs GSM8K, see below)
    python lessons/12_evaluate.py --checkpoint_path runs/pretrain/default/checkpoints/ckpt_best.pth \\
        --adapter_path runs/sft/peft/qlora/default/adapter.pth --quantize

With no checkpoint given it looks for each stage's files under runs/ (base, SFT full / LoRA / QLoRA,
DPO, GRPO, PPO) and lists the missing ones as "not trained yet". Chat models are asked zero-shot in
the chat format; the base model, which never saw a chat, gets --num_fewshot worked examples as plain
text. Greedy decoding throughout, so a score belongs to the checkpoint, not to a seed.

GSM8K is evaluated when data/raw/gsm8k_test.jsonl exists (`make lesson-0 ARGS="--gsm8k download"`)
or --gsm8k_path points at the official jsonl. Writes runs/eval/ (runs/eval/single/ for one
checkpoint): results.md, results.json, one SVG bar chart per task, samples/<stage>_<task>.jsonl.
The doc is lessons/12_evaluate.md.
"""

import contextlib
import io
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nano.common.config import THREADS_FOR_DECODING, parse_config, pick_device, print_config, save_config, set_threads, threads_field
from nano.common.fileio import write_json, write_text
from nano.common.paths import runs_dir
from nano.common.plot import bar_chart, write_svg
from nano.common.workers import map_batches
from nano.text.bins import load_pretrain_tokens
from nano.checkpoints.checkpoint import load_tokenizer
from nano.checkpoints.loading import STAGES, Stage
from nano.eval.evaluate import evaluate_model, load_task, parse_tasks, task_path
from nano.eval.val_loss import token_byte_lengths, validation_loss
from nano.eval.words_skill import MAX_NEW_TOKENS as WORDS_MAX_NEW_TOKENS
from nano.eval.words_skill import evaluate_words, load_words_prompts
from nano.eval.coherence import coherence, format_coherence, sample_stories

# Per-task defaults. TinyMath's worked answers are 48 tokens long at the median, 73 at most (lesson
# 1's tokenizer writes every digit as a token): 96 leaves room. GSM8K's answers are long and slow to
# generate, and a model this small scores ~0 on them anyway, so fewer problems.
# The words task asks for whole stories (chat stages only: the base model cannot take a request).
TASK_DEFAULTS = {
    "tinymath": {"limit": 200, "max_new_tokens": 96},
    "words": {"limit": 200, "max_new_tokens": WORDS_MAX_NEW_TOKENS},
    "gsm8k": {"limit": 50, "max_new_tokens": 256},
}


@dataclass
class EvalConfig:
    checkpoint_path: str = field(default="", metadata={"help": "evaluate this one checkpoint ('' = every stage under runs/)"})
    adapter_path: str = field(default="", metadata={"help": "LoRA/QLoRA adapter to put on --checkpoint_path"})
    quantize: bool = field(default=False, metadata={"help": "NF4-quantize --checkpoint_path's projections (QLoRA adapters want this)"})
    mode: str = field(default="auto", metadata={"help": "prompting for --checkpoint_path (auto: few-shot for a pretrain checkpoint, else chat)",
                                                "choices": ["auto", "chat", "fewshot"]})
    tasks: str = field(default="", metadata={"help": "comma-separated: tinymath, words, gsm8k ('' = tinymath and words, plus gsm8k if it is on disk)"})
    limit: int = field(default=0, metadata={"help": "problems per task (0 = tinymath 200, words 200, gsm8k 50)"})
    num_fewshot: int = field(default=3, metadata={"help": "worked examples shown to the base model (fewer if the context is full)"})
    max_new_tokens: int = field(default=0, metadata={"help": "answer length cap (0 = tinymath 96, gsm8k 256; at most half the context)"})
    batch_size: int = field(default=16, metadata={"help": "problems generated together"})
    gsm8k_path: str = field(default="", metadata={"help": "a local GSM8K test jsonl ('' = data/raw/gsm8k_test.jsonl)"})
    coherence_samples: int = field(default=100, metadata={"help": "stories sampled per stage to count character names and check pronouns (0: skip)"})
    val_batches: int = field(default=8, metadata={"help": "validation windows = val_batches x val_batch_size (lesson 4's numbers)"})
    val_batch_size: int = field(default=16, metadata={"help": "windows per validation batch"})
    out_dir: str = field(default="", metadata={"help": "where to write ('' = runs/eval, or runs/eval/single for one checkpoint)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    threads: int = threads_field(THREADS_FOR_DECODING)  # generation-bound; the doc measures 0 vs 1
    workers: int = field(default=2, metadata={"help": "stages evaluated at once on a CPU, each in a process of its own on one "
                                                      "core (1: one by one in this process, with progress bars)"})


# -----------------------------------------------------------------------------------------------
# 1. which models to evaluate


def single_stage(cfg: EvalConfig) -> Stage:
    """The --checkpoint_path form as a Stage, named after the stage it is when it is one of ours."""
    checkpoint = Path(cfg.checkpoint_path).resolve()
    adapter = Path(cfg.adapter_path).resolve() if cfg.adapter_path else None
    name = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.stem
    for stage in STAGES:
        ours, our_adapter = stage.paths()
        same_adapter = our_adapter.resolve() == adapter if our_adapter else adapter is None
        if ours.resolve() == checkpoint and same_adapter and stage.quantize == cfg.quantize:
            name = stage.name
    # auto: a pretrained model without an adapter has never seen the chat format -> few-shot
    chat = cfg.mode == "chat" or (cfg.mode == "auto" and not ("pretrain" in checkpoint.parts and adapter is None))
    return Stage(name, 0, str(checkpoint), str(adapter) if adapter else "", cfg.quantize, chat)


def mode_of(stage: Stage) -> str:
    """Chat models answer zero-shot in the chat format; the base model continues few-shot text."""
    return "chat" if stage.chat else "fewshot"


# -----------------------------------------------------------------------------------------------
# 2. which tasks


def choose_tasks(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(tasks to run, tasks shown as skipped). Asked-for tasks must exist; GSM8K is optional by default."""
    if cfg.tasks:
        names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        math = [t for t in names if t != "words"]
        tasks = parse_tasks(",".join(math)) if math else []  # an unknown name is an error listing the known ones
        for task in tasks:  # fail now, before loading any model, if a task's file is missing
            load_task(task, path=(cfg.gsm8k_path or None) if task == "gsm8k" else None, limit=1)
        if "words" in names:
            load_words_prompts("test")
            tasks.insert(min(1, len(tasks)), "words")
        return tasks, []
    tasks, skipped = ["tinymath"], []
    try:
        load_words_prompts("test")
        tasks.append("words")
    except FileNotFoundError as e:  # data/raw/ from before lesson 0 wrote them
        print(f"words: {e}")
        skipped.append("words")
    if cfg.gsm8k_path or task_path("gsm8k").is_file():
        return tasks + ["gsm8k"], skipped
    print(f'GSM8K: not on disk ({task_path("gsm8k")}), so it is not evaluated. '
          'To add it: make lesson-0 ARGS="--gsm8k download" (needs the network), or --gsm8k_path FILE.')
    return tasks, skipped + ["gsm8k"]


# -----------------------------------------------------------------------------------------------
# 3. evaluating one model


def evaluate_stages(stages: list[Stage], tasks: list[str], cfg: EvalConfig, device: str, out_dir: Path) -> dict[str, dict]:
    """Every stage's row, by name. Decoding a small model is bound by per-step overhead, so one
    process uses one core well and two processes get through the stages about twice as fast on two
    cores: with --workers N (on a CPU), N stages are evaluated at once in forked processes
    (nano/common/workers.py), and each stage's report is printed whole, in the lessons' order, when
    it is done. Greedy decoding and seeded sampling make every number the same either way (a test)."""
    workers = min(cfg.workers, len(stages)) if device == "cpu" else 1
    if workers <= 1:
        return {stage.name: evaluate_stage(stage, tasks, cfg, device, out_dir) for stage in stages}
    print(f"evaluating {len(stages)} stages {workers} at a time, one process and one core each; "
          f"each stage's report appears when it is done")
    rows = {}
    for row, printed in map_batches(evaluate_in_worker, stages, (tasks, cfg, device, out_dir), workers):
        print(printed, end="")
        rows[row["stage"]] = row
    return rows


def evaluate_in_worker(shared: tuple, stage: Stage) -> tuple[dict, str]:
    """evaluate_stage in a worker process: one thread, no progress bars, what it prints kept to return."""
    tasks, cfg, device, out_dir = shared
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        row = evaluate_stage(stage, tasks, cfg, device, out_dir, progress=False)
        print(f"({stage.name}: {row['seconds']:.0f} s)")
    return row, printed.getvalue()


def evaluate_stage(stage: Stage, tasks: list[str], cfg: EvalConfig, device: str, out_dir: Path,
                   progress: bool = True) -> dict:
    """Load one stage, grade it on every task, and measure its validation loss; returns its row."""
    start = time.time()
    # nano/checkpoints/loading.py: checkpoint -> NF4 (if asked) -> adapter; a QLoRA stage is evaluated
    # with its 4-bit weights dequantized once and merged, which computes the same numbers bit for bit
    # as dequantizing them in every forward (its words column took 35 s that way, full SFT's 10 s)
    model, info = stage.load(device, merge_4bit=True)
    tokenizer = load_tokenizer(info["tokenizer_fingerprint"])
    mode = mode_of(stage)
    print(f"\n=== {stage.name}: {info['description']}")
    row = {"stage": stage.name, "status": "evaluated", "mode": mode, "checkpoint": str(info["checkpoint_path"]),
           "adapter": str(info["adapter_path"]) if info["adapter_path"] else None, "quantized": stage.quantize,
           "results": {}}

    # 3a. the math problems and the words requests, graded; every sample goes to a jsonl file
    for task in tasks:
        limit = cfg.limit or TASK_DEFAULTS[task]["limit"]
        samples = out_dir / "samples" / f"{stage.name}_{task}.jsonl"
        if task == "words":
            row["results"]["words"] = words_task(model, tokenizer, mode, limit, cfg, samples, progress)
            continue
        result = evaluate_model(
            model, tokenizer, task, limit=limit, mode=mode,
            num_fewshot=cfg.num_fewshot if mode == "fewshot" else 0, batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens or TASK_DEFAULTS[task]["max_new_tokens"], out_jsonl=samples,
            task_file=(cfg.gsm8k_path or None) if task == "gsm8k" else None, progress=progress,
        )
        rows = result.pop("rows")  # every graded sample; also in the samples file
        result["samples"] = str(samples)
        if mode == "fewshot":  # long examples are dropped to fit the context: say how many fitted
            shots = [r["prompt"].count("Question:") - 1 for r in rows]
            result["shots_used"] = [min(shots), max(shots)] if shots else [0, 0]
        row["results"][task] = result
        shots = f", {result['shots_used'][0]}-{result['shots_used'][1]} shots fitted" if "shots_used" in result else ""
        print(f"{task}: {result['correct']}/{result['n']} = {100 * result['accuracy']:.1f}% "
              f"± {100 * result['stderr']:.1f} ({mode}{shots}) -> {samples}")
        print("  wrong answers: " + ", ".join(f"{kind} {n}" for kind, n in result["mistakes"].items()))

    # 3b. does it keep its characters? stories sampled at temperature 0.8 (nano/eval/coherence.py)
    row["coherence"] = coherence_of(model, tokenizer, mode, cfg)

    # 3c. validation loss and bits per byte on the held-out stories of lesson 2
    row["val_loss"], row["val_bpb"], row["val_note"] = float("nan"), float("nan"), ""
    try:
        tokens = load_pretrain_tokens("val", tokenizer)
        row["val_loss"], row["val_bpb"] = validation_loss(
            model, tokens, model.cfg.context_len, cfg.val_batches, cfg.val_batch_size,
            byte_lengths=token_byte_lengths(tokenizer), device=device)
        print(f"validation: {row['val_loss']:.4f} nats/token, {row['val_bpb']:.4f} bits/byte")
    except (FileNotFoundError, ValueError) as e:  # no bins, bins of another tokenizer, or too short
        row["val_note"] = str(e)
        print(f"validation loss skipped: {e}")
    row["seconds"] = round(time.time() - start, 1)
    return row


def words_task(model: torch.nn.Module, tokenizer, mode: str, limit: int, cfg: EvalConfig, samples: Path,
               progress: bool = True) -> dict | None:
    """The words skill of a chat stage on the held-out requests, greedy (None for the base model)."""
    if mode != "chat":
        print("words: skipped (the base model has never seen a request)")
        return None
    result = evaluate_words(model, tokenizer, load_words_prompts("test")[:limit], batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens or TASK_DEFAULTS["words"]["max_new_tokens"],
                            out_jsonl=samples, progress="words (chat)" if progress else "")
    result.pop("rows")
    result["samples"] = str(samples)
    print(f"words: every word used in {result['correct']}/{result['n']} = {100 * result['accuracy']:.1f}% "
          f"± {100 * result['stderr']:.1f}; share of words used {100 * result['mean_share']:.1f}% -> {samples}")
    return result


def coherence_of(model: torch.nn.Module, tokenizer, mode: str, cfg: EvalConfig) -> dict | None:
    """Character names per story and pronoun agreement of --coherence_samples sampled stories: the base model
    continues "Once upon a time", a chat stage answers the held-out words requests (None: skipped)."""
    if not cfg.coherence_samples:
        return None
    try:
        requests = [p.prompt for p in load_words_prompts("test")] if mode == "chat" else None
    except FileNotFoundError as e:
        print(f"characters: skipped ({e})")
        return None
    n = min(cfg.coherence_samples, len(requests)) if requests is not None else cfg.coherence_samples
    result = coherence(sample_stories(model, tokenizer, n, chat_prompts=requests))
    print(f"characters: {format_coherence(result)}")
    return result


def names_cell(c: dict | None) -> str:
    """'6.74 / 45.9% ± 5.8' (names per story / pronoun agreement ± stderr)."""
    if not c:
        return "—"
    return f"{c['names_per_story']:.2f} / {100 * c['pronoun_agreement']:.1f}% ± {100 * c['pronoun_stderr']:.1f}"


# -----------------------------------------------------------------------------------------------
# 4. the table, the chart, the files


def percent(result: dict | None) -> str:
    """'41.5% ± 3.5' (accuracy and its standard error, in points)."""
    if not result or result["n"] == 0:
        return "—"
    return f"{100 * result['accuracy']:.1f}% ± {100 * result['stderr']:.1f} (n={result['n']})"


COLUMN = {"words": "words: all used ± stderr"}


def table(rows: list[dict], tasks: list[str], skipped: list[str]) -> str:
    """One markdown table: a row per stage, trained or not; a column per task."""
    header = (["stage", "mode"] + [COLUMN.get(t, f"{t} acc ± stderr") for t in tasks + skipped]
              + ["names per story / pronouns agree", "val loss", "bpb"])
    lines = []
    for row in rows:
        if row["status"] != "evaluated":
            cells = [row["stage"], "—", row["status"]] + ["—"] * (len(tasks) + len(skipped) - 1) + ["—", "—", "—"]
        else:
            mode = "chat" if row["mode"] == "chat" else "few-shot"
            cells = ([row["stage"] + (" (4-bit)" if row["quantized"] else ""), mode]
                     + [percent(row["results"].get(t)) for t in tasks]
                     + ["not downloaded" if t == "gsm8k" else "not on disk" for t in skipped]
                     + [names_cell(row.get("coherence"))]
                     + [f"{row['val_loss']:.3f}" if math.isfinite(row["val_loss"]) else "—",
                        f"{row['val_bpb']:.3f}" if math.isfinite(row["val_bpb"]) else "—"])
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines])


def write_outputs(rows: list[dict], tasks: list[str], skipped: list[str], cfg: EvalConfig, out_dir: Path) -> str:
    """results.md, results.json and a bar chart per task; returns the table."""
    text = table(rows, tasks, skipped)
    notes = ["accuracy ± one standard error, sqrt(p(1-p)/n); greedy decoding; val loss in nats/token and "
             "bits per byte on the held-out stories (lesson 2's val.bin)",
             "words: the share of held-out 'use the words ...' requests whose story uses all three words "
             "(chat stages; — for the base model)",
             "names per story / pronouns agree: distinct character names in sampled stories (temperature 0.8, 160 "
             "tokens; the base model continues 'Once upon a time', chat stages answer the words requests) and the "
             "share whose hero keeps the pronoun of its kind; held-out stories of the corpus hold about 1.5 and agree 99%"]
    notes += [f"{t}: not on disk — " + ('make lesson-0 ARGS="--gsm8k download"' if t == "gsm8k" else "make lesson-0")
              for t in skipped]
    write_text(out_dir / "results.md", "# Evaluation\n\n" + text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    write_json(out_dir / "results.json", {"config": asdict(cfg), "tasks": tasks, "skipped": skipped, "stages": clean})
    for task in tasks:
        done = [r for r in rows if r["status"] == "evaluated" and (r["results"].get(task) or {}).get("n")]
        if done:
            n = done[0]["results"][task]["n"]
            svg = bar_chart({r["stage"]: 100 * r["results"][task]["accuracy"] for r in done},
                            title=f"{task}: accuracy per stage (greedy, n={n}, bars: ± 1 stderr)", ylabel="% correct",
                            errors={r["stage"]: 100 * r["results"][task]["stderr"] for r in done}, y_max=10.0)
            write_svg(out_dir / f"{task}.svg", svg)
    return text


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvalConfig, argv)
    print_config(cfg)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    tasks, skipped = choose_tasks(cfg)

    # 1. the models: one checkpoint, or every stage with its files on disk
    if cfg.checkpoint_path:
        stages = [single_stage(cfg)]
        out_dir = Path(cfg.out_dir) if cfg.out_dir else runs_dir() / "eval" / "single"
    else:
        stages = STAGES
        out_dir = Path(cfg.out_dir) if cfg.out_dir else runs_dir() / "eval"
        found = [s.name for s in stages if s.exists()]
        print(f"stages found under {runs_dir()}: {', '.join(found) or 'none'}")
        if not found:
            raise FileNotFoundError(f"no trained model under {runs_dir()} — run `make lesson-4` (pretraining) first")
    print(f"tasks: {', '.join(tasks)}; device {device}, {torch.get_num_threads()} CPU thread(s); writing to {out_dir}")
    save_config(cfg, out_dir)

    # 2. evaluate each one that exists; a row for each, in the order of the lessons
    evaluated = evaluate_stages([s for s in stages if cfg.checkpoint_path or s.exists()], tasks, cfg, device, out_dir)
    rows = [evaluated.get(stage.name) or {"stage": stage.name, "status": f"not trained yet (make lesson-{stage.lesson})"}
            for stage in stages]

    # 3. one table, and the files
    text = write_outputs(rows, tasks, skipped, cfg, out_dir)
    print(f"\n{text}\n")
    print("accuracy ± one standard error; val loss in nats/token; bpb = bits per byte of the held-out stories")
    print(f"wrote {out_dir / 'results.md'}, results.json, {', '.join(t + '.svg' for t in tasks)} and samples/")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input: one line that says what to do, no traceback
        sys.exit(f"error: {e}")
