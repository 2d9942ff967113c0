"""
The tests call the code under test through this thin layer, so you can judge your own code with them.

Every test file gets its module with `impl("tokenizer")`, which imports `nano.tokenizer` — unless
the environment variable NANO_IMPL_TOKENIZER names another module. To rewrite a concept from
scratch and let our tests be the judge:

    cp nano/tokenizer.py my_tokenizer.py        # or start from an empty file
    NANO_IMPL_TOKENIZER=my_tokenizer make check-1
    NANO_IMPL_TOKENIZER=path/to/my_tokenizer.py make check-1   # a file path works too

The variable is NANO_IMPL_ + the concept's name in capitals (MODEL, NF4, LORA, CHAT_FORMAT, ...).
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def impl(concept: str) -> ModuleType:
    """The module that implements `concept`: yours if NANO_IMPL_<CONCEPT> says so, else nano's."""
    override = os.environ.get(f"NANO_IMPL_{concept.upper()}")
    if not override:
        return importlib.import_module(f"nano.{concept}")
    if override.endswith(".py"):
        path = Path(override).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"NANO_IMPL_{concept.upper()}={override}: no such file")
        spec = importlib.util.spec_from_file_location(f"learner_{concept}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(override)
