"""
The lesson docs cite the code by name — `nano/train/trainer.py: lr_at`, `tests/test_04_trainer.py::test_schedule_values`,
`bench/bench_model.py` — and a learner follows those names. This test checks that every cited file
exists and every cited function, class, method or test is defined there, so the docs cannot drift
from the code without a test failing.
"""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "lessons").glob("*.md")) + [ROOT / "README.md"]

PATH = r"(?:nano|lessons|tests|bench|data)/[\w./-]*\w"
# `path`, `path: name`, `path: Class.method`, `path::test_name`
CITATION = re.compile(rf"`(?P<path>{PATH})(?:(?:: |::)(?P<name>[A-Za-z_][\w.]*))?(?:\(\))?`")
BARE_NAME = re.compile(r"`(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?:\(\))?`")
GENERATED = ("data/raw", "data/tokenizer", "data/bins", "runs/", "exercises/")  # made by the lessons, not in git


@cache
def defined_names(path: Path) -> frozenset[str]:
    """Every top-level function, class and assignment, Class.method, and any function defined inside
    another (a lesson's `make_batch` lives in its `main`), in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
                names |= {f"{node.name}.{t.id}" for item in node.body if isinstance(item, ast.AnnAssign)
                          for t in [item.target] if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return frozenset(names)


def citations(doc: Path):
    """(line number, path, name or None) for every citation. A list right after a cited name
    (`nano/x.py: a`, `b` and `c`) cites each name in the same file; after `Class.method`, a bare
    name may be another method of that class."""
    for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        for cell in line.split("|"):
            current, cls, end = None, "", 0
            for match in re.finditer(r"`[^`]+`", cell):
                text, between = match.group(0), cell[end : match.start()]
                end = match.end()
                cited = CITATION.fullmatch(text)
                if cited:
                    current = cited.group("path") if cited.group("name") else None
                    cls = cited.group("name").rsplit(".", 1)[0] + "." if "." in (cited.group("name") or "") else ""
                    yield lineno, cited.group("path"), cited.group("name")
                elif (current and current.endswith(".py") and BARE_NAME.fullmatch(text)
                      and between.strip() in (",", "and", ", and", "/")):
                    name = BARE_NAME.fullmatch(text).group("name")
                    names = defined_names(ROOT / current) if (ROOT / current).is_file() else frozenset()
                    yield lineno, current, cls + name if cls and cls + name in names else name
                else:
                    current = None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_file_and_name_exists(doc):
    missing = []
    for lineno, path, name in citations(doc):
        if path.startswith(GENERATED):
            continue
        file = ROOT / path
        if not file.exists():
            missing.append(f"{doc.name}:{lineno}: no file {path}")
        elif name and file.suffix == ".py" and name not in defined_names(file):
            missing.append(f"{doc.name}:{lineno}: {path} defines no {name}")
    assert not missing, "\n".join(missing)


def test_the_checker_catches_a_wrong_name(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("| merge | `nano/text/tokenizer.py: merge`, `no_such_function` |\nsee `nano/nope.py`\n")
    found = list(citations(doc))
    assert (1, "nano/text/tokenizer.py", "no_such_function") in found and (2, "nano/nope.py", None) in found
    assert "merge" in defined_names(ROOT / "nano" / "text" / "tokenizer.py")
    assert "no_such_function" not in defined_names(ROOT / "nano" / "text" / "tokenizer.py")
