"""
Where every lesson reads and writes, in one place.

Each lesson builds on the files of the one before it, so the paths must agree. They are all
relative to the repository root (not the current directory), so a script works from any folder.
Set NANO_DATA_DIR / NANO_RUNS_DIR to move them (the tests do, into temporary folders).

A training run lives in one folder, runs/<stage>/<run_name>/, laid out the same way by every
lesson (`RunPaths`):

    checkpoints/ckpt_best.pth    the best evaluation so far      checkpoints/ckpt_last.pth  for --resume
    checkpoints/policy_best.pth  the policy alone (lessons 9-11) adapter.pth                LoRA runs
    config.json   metrics.jsonl   report.json   loss.svg   samples.txt

A real run is named "default", and that is the run later lessons read. A smoke test
(`--fast_dev_run`) is named "fast-dev-run" unless you name it, so it never replaces a real run's
files (lesson 0's smoke data likewise goes to data/fast-dev-run/, not data/raw/).
"""

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # nano/common/paths.py -> the repository
LESSONS_DIR = REPO_ROOT / "lessons"
CONFIGS_DIR = LESSONS_DIR / "configs"

DEFAULT_RUN = "default"  # the run_name of a real run: what the later lessons read
FAST_DEV_RUN = "fast-dev-run"  # where a --fast_dev_run smoke test writes instead


def data_dir() -> Path:
    """data/: datasets (raw/), the tokenizer (tokenizer/) and token bins (bins/)."""
    return Path(os.environ.get("NANO_DATA_DIR", REPO_ROOT / "data"))


def raw_dir(fast_dev_run: bool = False) -> Path:
    """data/raw/: what lesson 0 writes (stories, conversations, TinyMath, preferences, prompts).

    Lesson 0's smoke test writes data/fast-dev-run/raw/ instead: its few hundred stories must not
    replace the real data that lessons 1 and 2 read.
    """
    return (data_dir() / FAST_DEV_RUN if fast_dev_run else data_dir()) / "raw"


def tokenizer_dir() -> Path:
    """data/tokenizer/: what lesson 1 writes."""
    return data_dir() / "tokenizer"


def bins_dir() -> Path:
    """data/bins/: what lesson 2 writes."""
    return data_dir() / "bins"


def runs_dir() -> Path:
    """runs/: checkpoints, metrics and plots of every training stage."""
    return Path(os.environ.get("NANO_RUNS_DIR", REPO_ROOT / "runs"))


# ---------------------------------------------------------------------------------------------
# one run: runs/<stage>/<run_name>/ and its files

CONFIG_FILE = "config.json"  # the resolved config, beside a run's outputs (nano/common/config.py: save_config)


def run_name_for(run_name: str, fast_dev_run: bool) -> str:
    """The name of a run's folder: the one given, else "fast-dev-run" for a smoke test, else "default".

    A smoke test that took the real run's name would overwrite its checkpoints, and the lessons
    after it would build on a model trained for four steps; a name you give still wins.

    >>> run_name_for("", False), run_name_for("", True), run_name_for("lr1e-3", True)
    ('default', 'fast-dev-run', 'lr1e-3')
    """
    return run_name or (FAST_DEV_RUN if fast_dev_run else DEFAULT_RUN)


@dataclass(frozen=True)
class RunPaths:
    """The files of one run, under its folder `dir` (absolute, or relative to runs/ as in the
    constants below).

    >>> run = RunPaths.relative("pretrain")
    >>> run.best.as_posix(), run.metrics.as_posix()
    ('pretrain/default/checkpoints/ckpt_best.pth', 'pretrain/default/metrics.jsonl')
    >>> RunPaths.relative("rlhf/online", method="grpo").policy.as_posix()
    'rlhf/online/grpo-default/checkpoints/policy_best.pth'
    """

    dir: Path

    @classmethod
    def relative(cls, stage: str, run_name: str = DEFAULT_RUN, method: str = "") -> "RunPaths":
        """The run <stage>/<run_name>, relative to runs/; <stage>/<method>-<run_name> where several
        methods share a stage (rlhf/online holds grpo-default and ppo-default)."""
        return cls(Path(stage) / (f"{method}-{run_name}" if method else run_name))

    @classmethod
    def of(cls, stage: str, run_name: str = DEFAULT_RUN, method: str = "") -> "RunPaths":
        """The run runs/<stage>/<run_name>/ (see `relative`)."""
        return cls(runs_dir() / cls.relative(stage, run_name, method).dir)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def best(self) -> Path:
        """The training state at the best evaluation (task.best_metric of nano/train/trainer.py)."""
        return self.checkpoints / "ckpt_best.pth"

    @property
    def last(self) -> Path:
        """The latest training state, what --resume continues from."""
        return self.checkpoints / "ckpt_last.pth"

    @property
    def policy(self) -> Path:
        """Lessons 9-11: the best policy alone as plain weights (adapters merged, no value head)."""
        return self.checkpoints / "policy_best.pth"

    @property
    def adapter(self) -> Path:
        """A LoRA run's adapter: A and B of every adapted layer, and the identity of its base."""
        return self.dir / "adapter.pth"

    @property
    def config(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        """One JSON line per step, and per evaluation."""
        return self.dir / "metrics.jsonl"

    @property
    def report(self) -> Path:
        """What the run achieved, as the lesson prints it at the end."""
        return self.dir / "report.json"

    @property
    def samples(self) -> Path:
        """Generations written at each evaluation."""
        return self.dir / "samples.txt"

    @property
    def loss_plot(self) -> Path:
        return self.dir / "loss.svg"


# What each stage leaves for the lessons after it, under runs/: always the real ("default") run.
BASE_CHECKPOINT = RunPaths.relative("pretrain").best.as_posix()  # lesson 4: where SFT starts; "base" in evaluation
SFT_CHECKPOINT = RunPaths.relative("sft/full").best.as_posix()  # lesson 5: where lessons 8-11 start
REWARD_MODEL = RunPaths.relative("rm").best.as_posix()  # lesson 8: PPO's --reward rm


def input_path(given: str | Path, default: str) -> Path:
    """A file a lesson reads: the path given on the command line, else `default` under runs/.

    The default is a real run's file (the constants above), for a smoke test too: lesson 5's
    --fast_dev_run starts from lesson 4's trained model, not from lesson 4's smoke run.
    """
    return Path(given) if given else runs_dir() / default


def require(path: Path, what: str, lesson: int) -> Path:
    """Return `path` if it exists, else stop with a message that says which lesson makes it.

    >>> require(Path("/nope"), "token bins", 2)
    Traceback (most recent call last):
    FileNotFoundError: no token bins at /nope — run `make lesson-2` first
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"no {what} at {path} — run `make lesson-{lesson}` first")
    return Path(path)
