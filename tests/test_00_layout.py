"""
The house rules, checked: the library stays layered, its rooms stay small, and the repository stands alone.

These test the project, not a learner's module:
  * nano/ is a handful of wings (sub-packages, one level deep), one per arc of the model's life, and
    every module lives in one of them;
  * the wings are layered: a module imports from its own wing or from a wing below it in WINGS,
    never from one above (that would make the lower wing unreadable without the higher one);
  * the modules import each other without a circle (a circle means two concepts that cannot be
    read apart), counting imports inside functions too, since those run just the same;
  * an import inside a function says why it is there;
  * no module grows past MAX_MODULE_LINES (one concept per module, readable in one sitting);
  * nothing points outside the repository: a learner who clones it has only the repository.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NANO = ROOT / "nano"
# bottom to top: each wing builds only on those before it
WINGS = ["common", "data", "text", "model", "checkpoints", "eval", "train", "align", "serve"]
MODULES = sorted(p for p in NANO.rglob("*.py") if p.name != "__init__.py")
MAX_MODULE_LINES = 650  # "a few hundred lines": ~600, with a little slack for a docstring that grows


def dotted(path: Path) -> str:
    """nano/text/bins.py -> 'text.bins'."""
    return ".".join(path.relative_to(NANO).with_suffix("").parts)


def nano_imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules of nano imported at the top level, [(line, module)] of nano imports inside functions),
    each as 'wing.module'.

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
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nano."):
            wing_only = node.module.count(".") == 1  # `from nano.text import bins` names the module after import
            names = [f"{node.module}.{a.name}" for a in node.names] if wing_only else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("nano.")]
        for name in names:
            module = ".".join(name.split(".")[1:3])
            if node in tree.body:
                top.add(module)
            else:
                local.append((node.lineno, module))
    return top, local


def import_graph() -> dict[str, set[str]]:
    """'wing.module' -> every nano module it imports, at the top or inside a function."""
    graph = {}
    for path in MODULES:
        top, local = nano_imports(path)
        graph[dotted(path)] = (top | {module for _, module in local}) - {dotted(path)}
    return graph


def test_every_module_lives_in_a_wing():
    loose = [p.name for p in NANO.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the wings: {loose}; move each into the wing of its arc"
    wings = sorted(p.name for p in NANO.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert wings == sorted(WINGS), f"the wings on disk {wings} differ from WINGS {WINGS}"
    deep = [str(p.relative_to(NANO)) for p in MODULES if len(p.relative_to(NANO).parts) != 2]
    assert not deep, f"wings are one level deep: {deep}"


def test_wings_import_only_downwards():
    upward = [f"{module} imports {imported}: {module.split('.')[0]}/ sits below {imported.split('.')[0]}/"
              for module, imports in import_graph().items() for imported in sorted(imports)
              if WINGS.index(imported.split(".")[0]) > WINGS.index(module.split(".")[0])]
    assert not upward, "a wing imports from a wing above it:\n" + "\n".join(upward)


def test_modules_import_each_other_without_a_circle():
    graph = import_graph()
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


def test_the_layout_checks_can_fail(tmp_path):
    """The graph reads imports inside functions: a circle closed only by one is still found."""
    (tmp_path / "a.py").write_text("from nano.model.lora import x\ndef f():\n    from nano.model.gemma import y  # why\n")
    top, local = nano_imports(tmp_path / "a.py")
    assert top == {"model.lora"} and local == [(3, "model.gemma")]


def test_imports_inside_functions_say_why():
    """A local `from nano.x.y import z` needs a comment on its line or the line above (which circle it
    breaks, or why the import is deferred); everything else is imported at the top of the file."""
    silent = []
    for path in MODULES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, module in nano_imports(path)[1]:
            here, above = lines[lineno - 1], lines[lineno - 2] if lineno >= 2 else ""
            in_docstring = here.strip().startswith(">>>")
            if not in_docstring and "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{dotted(path)}:{lineno} imports nano.{module} inside a function without saying why")
    assert not silent, "\n".join(silent)


@pytest.mark.parametrize("path", MODULES, ids=dotted)
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{dotted(path)} has {lines} lines: split it into rooms of one concept each"


def test_nothing_points_outside_the_repository():
    files = [p for folder in ("nano", "lessons", "tests", "bench") for p in (ROOT / folder).rglob("*")
             if p.suffix in (".py", ".md", ".html", ".json") and p.is_file()]
    files += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    outside = ("../" + "shared", "DESIGN" + ".md", "REFERENCE" + ".md")  # (split so this file passes too)
    found = [f"{p.relative_to(ROOT)}: {word}" for p in files for word in outside
             if word in p.read_text(encoding="utf-8", errors="replace")]
    assert not found, "the repository must stand alone:\n" + "\n".join(found)
