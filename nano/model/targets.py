"""
Which layers a method touches, by name: the patterns LoRA (lesson 6) and NF4 (lesson 7) share.

A model's layers have dotted names ("layers.0.self_attn.q_proj"). LoRA wraps, and NF4 quantizes, the
layers whose names match a list of targets: a plain target is a suffix of whole name parts, and
"re:<regex>" matches whole names. Both methods read the same targets, so QLoRA quantizes exactly the
layers it then adapts.
"""

import re
from typing import Iterable

# every linear layer of attention and MLP in Gemma-2 (Hugging Face names); not the embedding / LM head
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(targets: str | Iterable[str]) -> list[str]:
    """Targets as a list; one string is split on commas, so a command-line value works as it is.

    >>> parse_targets("q_proj, v_proj")
    ['q_proj', 'v_proj']
    """
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def name_matches(name: str, targets: str | Iterable[str]) -> bool:
    """Does the dotted module name `name` match one of `targets`?

    A plain target matches a name that equals it or ends with "." + target (a suffix on whole name
    parts); a target that starts with "re:" is a regular expression that must match the whole name.
    A single string is split on commas (parse_targets).

    >>> name_matches("layers.0.self_attn.q_proj", ["q_proj"])
    True
    >>> name_matches("layers.0.self_attn.q_proj", "self_attn.q_proj,v_proj")
    True
    >>> name_matches("layers.0.self_attn.xq_proj", ["q_proj"])    # whole parts only
    False
    >>> name_matches("layers.1.mlp.up_proj", [r"re:layers\\.[01]\\.mlp\\..*"])
    True
    """
    for target in parse_targets(targets):
        if target.startswith("re:"):
            if re.fullmatch(target[3:], name):
                return True
        elif name == target or name.endswith("." + target):
            return True
    return False
