"""
The learner's route, checked end to end for lessons 1, 3, 6, 7, 9, 10 and 11 (and, for every lesson
with stubs, that `make exercise-N` writes modules that import):

    make exercise-N                  -> exercises/<module>.py: signatures and docstrings, no bodies
    (write one function)
    make check-N K=<its test>        -> that test passes
    make check-N                     -> the tests of what is not written yet fail, each saying so,
                                        and none fails to be collected

Here "writing" a function is copying nano's own (so the test needs no learner); everything else
is what a learner gets. These tests check the route, not a learner's module.
"""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import make_exercise  # noqa: E402  (tests/ is on sys.path only from here on)
from adapters import module_path  # noqa: E402

# (lesson, module, what the learner writes, the tests of exactly that, the rest to run: None = all;
#  for lessons 9-11 the unit tests, without the smoke runs that would build a whole pipeline here)
UNIT_TESTS_ONLY = "not lesson_ and not resume and not refused and not needs_prompts and not names_lesson"
ROUTES = [
    (1, "tokenizer", ["merge"], "test_merge_replaces_pairs_left_to_right", None),
    (3, "attention", ["allowed_keys"], "test_window_boundary", None),
    (6, "lora", ["LoRALinear", "LoRAFunction", "merged_weight", "base_weight", "is_linear", "is_4bit", "_device_of"],
     "rslora_scaling or forward_formula or gradients_equal", None),
    (7, "nf4", ["nf4_code_values"], "test_code_values", None),
    (9, "dpo", ["dpo_loss"], "dpo_loss_and_metrics_check_vector or cdpo_and_ipo", UNIT_TESTS_ONLY),
    (10, "grpo", ["group_advantages"], "group_advantages", UNIT_TESTS_ONLY),
    (11, "ppo", ["gae"], "gae", UNIT_TESTS_ONLY),
]


def write_with_nano_versions(stub: str, module: str, names: list[str]) -> str:
    """The stub with the top-level functions/classes `names` replaced by nano's own source."""
    source = module_path(module).read_text(encoding="utf-8")
    nano_nodes = {n.name: n for n in ast.parse(source).body if hasattr(n, "name")}
    stub_lines = stub.splitlines(keepends=True)
    source_lines = source.splitlines(keepends=True)
    # replace from the bottom up, so earlier line numbers stay valid
    stub_nodes = sorted((n for n in ast.parse(stub).body if getattr(n, "name", None) in names),
                        key=lambda n: -n.lineno)
    assert len(stub_nodes) == len(names), f"the stub lacks some of {names}"
    for node in stub_nodes:
        theirs = nano_nodes[node.name]
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        their_start = min([d.lineno for d in theirs.decorator_list] + [theirs.lineno]) - 1
        stub_lines[start : node.end_lineno] = source_lines[their_start : theirs.end_lineno]
    return uncomment_what_now_works("".join(stub_lines), set(names))


def uncomment_what_now_works(text: str, written: set[str]) -> str:
    """Do what the stub asks once a function works: uncomment "# (uncomment once f works)" blocks
    (and, in turn, the constants computed from those)."""
    lines = text.splitlines(keepends=True)
    changed = True
    while changed:
        changed = False
        for i, line in enumerate(lines):
            if line.startswith("# (uncomment once ") and line.rstrip().endswith(" works)"):
                waits_for = set(line[len("# (uncomment once "):].rstrip()[: -len(" works)")].split(", "))
                if waits_for <= written:
                    lines[i] = ""
                    j = i + 1
                    while j < len(lines) and lines[j].startswith("# "):
                        lines[j] = lines[j][2:]
                        written |= {n.id for n in ast.walk(ast.parse(lines[j].strip() or "pass"))
                                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                        j += 1
                    changed = True
    return "".join(lines)


def run_check(lesson: int, module: str, path, k: str | None) -> subprocess.CompletedProcess:
    files = sorted(str(p) for p in (ROOT / "tests").glob(f"test_{lesson:02d}_*.py"))
    env = {**os.environ, f"NANO_IMPL_{module.upper()}": str(path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                           *(["-k", k] if k else [])], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("lesson, module, written, tests, rest", ROUTES, ids=[f"lesson-{r[0]}" for r in ROUTES])
def test_fill_one_function_and_check_it(tmp_path, lesson, module, written, tests, rest):
    # 1. make exercise-N writes the stub
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "make_exercise.py"), str(lesson),
                          "--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    stub_path = tmp_path / f"{module}.py"
    assert f"NANO_IMPL_{module.upper()}=" in out.stdout  # it says how to test it
    stub = stub_path.read_text()
    assert "raise NotImplementedError" in stub

    # 2. the learner writes one function (here: nano's own)
    stub_path.write_text(write_with_nano_versions(stub, module, written))

    # 3. its tests pass...
    mine = run_check(lesson, module, stub_path, tests)
    assert mine.returncode == 0 and " passed" in mine.stdout, mine.stdout[-3000:]

    # 4. ...and the rest fail, one by one, saying what is not written yet (no collection error)
    everything = run_check(lesson, module, stub_path, rest)
    # (a fixture that builds on an unwritten function fails its tests' set-up: pytest says ERROR there)
    assert everything.returncode == 1, everything.stdout[-3000:]
    assert "ERROR collecting" not in everything.stdout and "during collection" not in everything.stdout
    assert " passed" in everything.stdout.splitlines()[-1]
    assert "is not written yet" in everything.stdout or "has no `" in everything.stdout


@pytest.mark.parametrize("lesson", sorted(make_exercise.LESSON_MODULES))
def test_every_lesson_with_stubs_gets_modules_that_import(tmp_path, lesson, capsys):
    """make exercise-N for every lesson that has stubs: each stub is a module that imports (its
    constants and classes stand, bodies raise), with every body left to write."""
    assert make_exercise.main([str(lesson), "--out_dir", str(tmp_path)]) == 0
    for module in make_exercise.LESSON_MODULES[lesson]:
        stub_path = tmp_path / f"{module}.py"
        spec = importlib.util.spec_from_file_location(f"stub_{lesson}_{module}", stub_path)
        stub = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = stub  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(stub)
        finally:
            del sys.modules[spec.name]
        functions = [n for n in ast.walk(ast.parse(stub_path.read_text())) if isinstance(n, ast.FunctionDef)]
        assert functions and all("not written yet" in ast.unparse(f) for f in functions), module


def test_one_function_overlay_keeps_the_rest_of_nano(tmp_path):
    """make exercise-2 FN=sft_batch: only sft_batch is the learner's; the tests take the rest from nano."""
    subprocess.run([sys.executable, str(ROOT / "tests" / "make_exercise.py"), "2", "--only", "sft_batch",
                    "--out_dir", str(tmp_path)], check=True, capture_output=True)
    stub_path = tmp_path / "bins_sft_batch.py"
    text = stub_path.read_text()
    assert 'OVERLAY_ON = "nano.text.bins"' in text and "def sft_batch(" in text and "def load_meta(" not in text
    failing = run_check(2, "bins", stub_path, "sft_batch")
    assert failing.returncode == 1 and "sft_batch is not written yet" in failing.stdout
    stub_path.write_text(write_with_nano_versions(text, "bins", ["sft_batch"]).replace(
        'OVERLAY_ON = "nano.text.bins"', 'OVERLAY_ON = "nano.text.bins"\nfrom nano.text.bins import _inputs_and_targets'))
    passing = run_check(2, "bins", stub_path, "sft_batch")
    assert passing.returncode == 0, passing.stdout[-3000:]


def test_test_files_look_names_up_when_they_run():
    """No test file reads a name of the module under test at import time (module level, decorators,
    default arguments): a learner's partial module must not stop a whole file from being collected."""
    early = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {t.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                   and getattr(node.value.func, "id", "") == "impl" for t in node.targets if isinstance(t, ast.Name)}
        at_import = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                at_import += node.decorator_list + getattr(node.args, "defaults", []) if isinstance(node, ast.FunctionDef) \
                    else node.decorator_list + node.bases + [b for b in node.body if not isinstance(b, ast.FunctionDef)]
            else:
                at_import.append(node)
        early += [f"{path.name}:{n.lineno}: {n.value.id}.{n.attr}" for part in at_import for n in ast.walk(part)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules]
    assert not early, "read at import time (move inside the tests):\n" + "\n".join(early)
