"""
Write a starting point for an exercise: a module of nano/'s wings with every body taken out.

    python tests/make_exercise.py tokenizer                  # -> exercises/tokenizer.py
    python tests/make_exercise.py bins --only sft_batch      # -> exercises/bins_sft_batch.py
    (or: make exercise-1, make exercise-2 FN=sft_batch)

The stub keeps what is not the exercise — imports, constants, dataclass fields, signatures and
docstrings — and replaces each function's body with `raise NotImplementedError`. Fill in one
function, then run its tests alone (`make check-1 K=merge`): they pass, and the tests of what you have
not written yet fail with "not written yet", one by one, until the whole module is yours.

With --only NAME, the stub holds that one function and `OVERLAY_ON = "nano.<wing>.<module>"`: the tests
take every other name from nano (see tests/adapters.py).
"""

import argparse
import ast
import sys
from pathlib import Path

from adapters import module_name, module_path

ROOT = Path(__file__).resolve().parent.parent

# the concept modules of each lesson, in the order a learner meets them
LESSON_MODULES = {
    0: ["tinymath"], 1: ["tokenizer"], 2: ["chat_format", "bins"], 3: ["attention", "gemma"],
    4: ["trainer", "val_loss"], 5: ["sft"], 6: ["lora"], 7: ["nf4"], 8: ["reward_model"], 9: ["dpo", "flaws"],
    10: ["logprobs", "rollout", "grpo"], 11: ["ppo"], 12: ["grading", "evaluate"], 13: ["generate"],
    14: ["kv_cache", "scheduler", "engine"],
}


def _stub_body(name: str, indent: str, module: str) -> str:
    return f'{indent}raise NotImplementedError("{name} is not written yet: see its docstring and the tests of {module}.py")\n'


def _stub_function(node: ast.FunctionDef, lines: list[str], module: str, qualname: str,
                   defined: set[str] = frozenset()) -> str:
    """Decorators, signature and docstring of `node`, then a body that raises.

    A decorator the module itself defines would run the learner's unwritten code at import time:
    it stays in the stub as a comment, to put back once it works.
    """
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    own = {d.lineno for d in node.decorator_list
           if {n.id for n in ast.walk(d) if isinstance(n, ast.Name)} & defined}
    lines = [f"# {line.lstrip()}".rjust(len(line) + 2) if i + 1 in own else line for i, line in enumerate(lines)]
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    header_end = body[0].end_lineno if has_doc else body[0].lineno - 1  # keep the docstring
    header = "".join(lines[first:header_end])
    if not has_doc and body[0].lineno == node.lineno:  # a one-line `def f(): return x`
        header = lines[first][: lines[first].index(":", lines[first].index(")")) + 1] + "\n"
    indent = " " * body[0].col_offset if body[0].lineno != node.lineno else " " * (node.col_offset + 4)
    return header + _stub_body(qualname, indent, module)


def _stub_class(node: ast.ClassDef, lines: list[str], module: str, defined: set[str]) -> str:
    """The class line and docstring, its fields and constants as they are, its methods as stubs."""
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    out = ["".join(lines[first : node.body[0].lineno - 1])]
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(_stub_function(item, lines, module, f"{node.name}.{item.name}", defined))
        else:  # docstring, dataclass fields, class constants: not the exercise
            start = min([d.lineno for d in getattr(item, "decorator_list", [])] + [item.lineno]) - 1
            out.append("".join(lines[start : item.end_lineno]))
    return "\n".join(out)


def make_stub(module: str, only: str | None = None) -> str:
    """The stub's text for nano/<wing>/<module>.py (or only its function `only`)."""
    source_path = module_path(module)
    dotted, shown = module_name(module), source_path.relative_to(ROOT)
    source = source_path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    deferred: set[str] = set()  # constants left commented out, and so everything computed from them
    parts = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue  # the module's own demo: not part of the exercise
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            parts.append("".join(lines[node.lineno - 1 : node.end_lineno]))
        elif only is not None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == only:
                parts.append("\n\n" + _stub_function(node, lines, module, node.name, defined))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append("\n\n" + _stub_function(node, lines, module, node.name, defined))
        elif isinstance(node, ast.ClassDef):
            parts.append("\n\n" + _stub_class(node, lines, module, defined))
        elif isinstance(node, ast.Expr) and node is tree.body[0]:
            parts.append("".join(lines[node.lineno - 1 : node.end_lineno]) + "\n")  # the module docstring
        else:  # constants and other module-level statements
            text = "".join(lines[node.lineno - 1 : node.end_lineno])
            calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            uses = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            waits_for = (calls & defined) | (uses & deferred)
            if waits_for:  # computed by a function the learner has yet to write: not at import time
                text = "".join(f"# {line}" for line in text.splitlines(keepends=True))
                text = f"# (uncomment once {', '.join(sorted(waits_for))} works)\n" + text
                deferred |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            parts.append(text)
    if only is not None:
        if not any(only in p for p in parts[-1:]):
            raise SystemExit(f"{shown} has no top-level function {only!r}")
        intro = (f'"""Exercise: write `{only}` (from {shown}). Every other name the tests need comes\n'
                 f'from {dotted}, because of OVERLAY_ON below (tests/adapters.py)."""\n\n')
        return intro + "".join(p for p in parts if not p.startswith("\n\n")) + f'\nOVERLAY_ON = "{dotted}"\n' \
            + "".join(p for p in parts if p.startswith("\n\n"))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="a module of nano/ (tokenizer, lora, ...) or a lesson number")
    parser.add_argument("--only", default="", help="one top-level function: the rest comes from nano")
    parser.add_argument("--out_dir", default=str(ROOT / "exercises"))
    parser.add_argument("--force", action="store_true", help="overwrite an existing exercise file")
    args = parser.parse_args(argv)
    if args.target.isdigit():
        lesson = int(args.target)
        if lesson not in LESSON_MODULES:
            raise SystemExit(f"lesson {lesson} has no exercise module; lessons with one: {sorted(LESSON_MODULES)}")
        modules = LESSON_MODULES[lesson] if not args.only else [
            next((m for m in LESSON_MODULES[lesson] if f"\ndef {args.only}(" in module_path(m).read_text()),
                 LESSON_MODULES[lesson][0])]
    else:
        lesson = next((n for n, ms in LESSON_MODULES.items() if args.target in ms), None)
        modules = [args.target]
    for module in modules:
        try:
            module_path(module)
        except LookupError as error:
            raise SystemExit(str(error)) from None
        out = Path(args.out_dir) / (f"{module}_{args.only}.py" if args.only else f"{module}.py")
        if out.exists() and not args.force:
            print(f"{out} exists: keeping your work (--force to start over)")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(make_stub(module, args.only or None), encoding="utf-8")
            print(f"wrote {out}")
        check = f"make check-{lesson}" if lesson is not None else "make test"
        print(f"  test it:  NANO_IMPL_{module.upper()}={out} {check} K={args.only or '<a test name>'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
