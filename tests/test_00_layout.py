"""
The house rules, checked: the library stays layered, its rooms stay small, and the repository stands alone.

These test the project, not a learner's module:
  * the modules of nano/ import each other in layers, without a circle (a circle means two
    concepts that cannot be read apart), and an import inside a function says why it is there;
  * no module grows past MAX_MODULE_LINES (one concept per module, readable in one sitting);
  * nothing points outside the repository: a learner who clones it has only the repository.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "nano").glob("*.py"))
MAX_MODULE_LINES = 650  # "a few hundred lines": ~600, with a little slack for a docstring that grows


def nano_imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules of nano imported at the top level, [(line, module)] of nano imports inside functions).

    A module's `if __name__ == "__main__":` demo is a script of its own, not part of the library: its
    imports are left out.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    demo = {id(n) for block in tree.body if isinstance(block, ast.If) and "__main__" in ast.unparse(block.test)
            for n in ast.walk(block)}
    top, local = set(), []
    for node in ast.walk(tree):
        if id(node) in demo:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nano"):
            names = [node.module] if node.module != "nano" else [f"nano.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("nano.")]
        for name in names:
            module = name.split(".")[1]
            if node in tree.body:
                top.add(module)
            else:
                local.append((node.lineno, module))
    return top, local


def test_modules_import_each_other_without_a_circle():
    graph = {path.stem: nano_imports(path)[0] - {path.stem} for path in MODULES}
    done, on_path = set(), []

    def visit(module: str) -> None:
        if module in on_path:
            circle = on_path[on_path.index(module):] + [module]
            pytest.fail("import circle: " + " -> ".join(circle))
        if module in done or module not in graph:
            return
        on_path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_imports_inside_functions_say_why():
    """A local `from nano.x import y` needs a comment on its line or the line above (which circle it
    breaks, or why the import is deferred); everything else is imported at the top of the file."""
    silent = []
    for path in MODULES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, module in nano_imports(path)[1]:
            here, above = lines[lineno - 1], lines[lineno - 2] if lineno >= 2 else ""
            in_docstring = here.strip().startswith(">>>")
            if not in_docstring and "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{path.name}:{lineno} imports nano.{module} inside a function without saying why")
    assert not silent, "\n".join(silent)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it into rooms of one concept each"


def test_nothing_points_outside_the_repository():
    files = [p for folder in ("nano", "lessons", "tests", "bench") for p in (ROOT / folder).rglob("*")
             if p.suffix in (".py", ".md", ".html", ".json") and p.is_file()]
    files += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    outside = ("../" + "shared", "DESIGN" + ".md", "REFERENCE" + ".md")  # (split so this file passes too)
    found = [f"{p.relative_to(ROOT)}: {word}" for p in files for word in outside
             if word in p.read_text(encoding="utf-8", errors="replace")]
    assert not found, "the repository must stand alone:\n" + "\n".join(found)
