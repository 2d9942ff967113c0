"""
The tests call the code under test through this thin layer, so you can judge your own code with them.

Every test file gets its module with `impl("tokenizer")`, which is `nano.text.tokenizer` — unless the
environment variable NANO_IMPL_TOKENIZER names another module (a path to a .py file, or an
importable name). To rewrite a concept from scratch and let our tests be the judge:

    make exercise-1                              # writes exercises/tokenizer.py: signatures + docstrings
    NANO_IMPL_TOKENIZER=exercises/tokenizer.py make check-1 K=merge     # one test at a time
    NANO_IMPL_TOKENIZER=exercises/tokenizer.py make check-1             # all of lesson 1's tests

The variable is NANO_IMPL_ + the concept's name in capitals (MODEL, NF4, LORA, CHAT_FORMAT, ...).

The tests are the specification: each test file's docstring lists the names it needs from your
module, and each test says in its name and body what those names must do. Names are looked up when
a test runs, not when the file is collected, so a module that has only `merge` so far runs the
tests of `merge`, and every other test fails with "your module has no `Tokenizer` yet".

One function inside a large module (e.g. `sft_batch` in nano/text/bins.py) can be yours alone: a file
that sets `OVERLAY_ON = "nano.text.bins"` replaces only the names it defines, and every other name
comes from nano.text.bins (`make exercise-2 FN=sft_batch` writes such a file).
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


NANO = Path(__file__).resolve().parent.parent / "nano"


def module_path(concept: str) -> Path:
    """nano/<wing>/<concept>.py: every module name is unique across the wings, so the name alone finds it."""
    found = sorted(NANO.glob(f"*/{concept}.py"))
    if len(found) != 1:
        wings = sorted(p.parent.name for p in found)
        raise LookupError(f"no module {concept}.py in nano's wings" if not found
                          else f"{concept}.py is in several wings: {wings}")
    return found[0]


def module_name(concept: str) -> str:
    """'tokenizer' -> 'nano.text.tokenizer'."""
    return f"nano.{module_path(concept).parent.name}.{concept}"


class Implementation:
    """A module as the tests see it: attribute lookups go to the learner's module (or nano's), and a
    missing name is an error that says what to write, raised when a test uses it."""

    def __init__(self, concept: str, module: ModuleType, fallback: ModuleType | None = None):
        self._concept, self._module, self._fallback = concept, module, fallback

    def __getattr__(self, name: str):
        for module in (self._module, self._fallback):
            if module is not None and hasattr(module, name):
                return getattr(module, name)
        if name.startswith("__"):  # Python's own probes (copy, pickle, ...) get the usual answer
            raise AttributeError(name)
        raise AttributeError(
            f"your module {self._module.__file__} has no `{name}` yet (the tests of "
            f"{self._concept!r} need it): write it, or run one test at a time with make check-N K=<name>")

    def __repr__(self) -> str:
        return f"<implementation of {self._concept!r}: {self._module.__name__}>"


def impl(concept: str):
    """The module that implements `concept`: yours if NANO_IMPL_<CONCEPT> says so, else nano's."""
    override = os.environ.get(f"NANO_IMPL_{concept.upper()}")
    if not override:
        return importlib.import_module(module_name(concept))
    module = _load(concept, override)
    fallback_name = getattr(module, "OVERLAY_ON", None)
    fallback = importlib.import_module(fallback_name) if fallback_name else None
    return Implementation(concept, module, fallback)


def _load(concept: str, override: str) -> ModuleType:
    if not override.endswith(".py"):
        return importlib.import_module(override)
    path = Path(override).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"NANO_IMPL_{concept.upper()}={override}: no such file")
    spec = importlib.util.spec_from_file_location(f"learner_{concept}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
