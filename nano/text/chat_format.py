"""
The chat format: a conversation -> token ids, plus the mask of the tokens the model learns from.

A base model only continues text. To make it answer, we fine-tune on conversations written in a
fixed layout of turns, and at inference we write the user's message in that same layout and let
the model continue from "<start_of_turn>model\\n". We use Gemma's layout; every later lesson (SFT,
DPO, GRPO/PPO, evaluation, the chat CLI and the server) calls this one module, so the model always
sees exactly the format it was trained on:

    <bos><start_of_turn>user\\n{question}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

The loss mask is 1 exactly on the assistant's content tokens and the <end_of_turn> that closes
them: the model learns to write answers (and to stop), not to imitate the user.

Try it: `python -m nano.text.chat_format` prints a rendered conversation with the trained-on tokens in
[brackets] (needs the tokenizer of `make lesson-1`); `make check-2` runs tests/test_02_chat_format.py.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from nano.text.pretokenize import special_regex

# The two tokens that end a model reply. <end_of_turn> is what a chat model writes after its
# answer; <eos> ends pretraining documents, so a model that slips back into story mode stops too.
STOP_TOKENS: tuple[str, ...] = ("<end_of_turn>", "<eos>")

# Gemma has two roles. We keep the OpenAI names in our messages ("assistant") and render the
# assistant as "model", the word Gemma's format uses. Gemma has no system role: see _fold_system.
ROLE_IN_TEMPLATE: dict[str, str] = {"user": "user", "assistant": "model"}
KNOWN_ROLES = ("system", "user", "assistant")

# a target equal to this is left out of the loss: the prompt's tokens in SFT, padding (PyTorch's
# cross_entropy skips -100 by default; nano/model/gemma.py's loss reads it from here)
IGNORE_INDEX = -100

Message = Mapping[str, str]


# -----------------------------------------------------------------------------
# special tokens and plain-text encoding


def special_id(tokenizer, name: str) -> int:
    """The id of a special token such as "<end_of_turn>" (3 with nano's tokenizer), or a clear error."""
    try:
        return tokenizer.special_tokens[name]
    except KeyError:
        raise ValueError(
            f"the tokenizer has no special token {name!r} (it has {sorted(tokenizer.special_tokens)}); "
            "the chat format needs nano's SPECIAL_TOKENS — re-train it with `make lesson-1`"
        ) from None


def pad_token_id(tokenizer) -> int:
    """The id that fills the short rows of a batch (nano/text/padding.py): <pad>, 0 with nano's tokenizer.

    Padding is never read as text (a mask or a length hides it), so a tokenizer without <pad> (your
    own, perhaps) pads with 0 instead of failing. (An exported model must name its real <pad>:
    nano/checkpoints/export.py asks special_id, which refuses a tokenizer without one.)
    """
    return getattr(tokenizer, "special_tokens", {}).get("<pad>", 0)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: [<end_of_turn>, <eos>] -> [4, 1] with nano's tokenizer."""
    return [special_id(tokenizer, name) for name in STOP_TOKENS]


def encode_text(tokenizer, text: str) -> list[int]:
    """Encode `text` as plain text: a literal "<end_of_turn>" in it stays text, never the special token.

    Why it matters: special tokens are the format's punctuation. If a user could type
    "<end_of_turn>" and get the real token, they could close their own turn and write a fake
    "model" turn (a prompt injection), and training data quoting the format would corrupt masks.
    So special tokens enter the ids only as ids, inserted by this module.

    nano's tokenizer has a plain-text path, `encode_ordinary`. For a tokenizer without one (your
    own, perhaps) we cut each special-token name in the text in two before encoding it
    ("<" + "end_of_turn>"), so its special matcher never sees the whole name; the decoded text is
    still exactly the input.

    >>> from nano.text.tokenizer import Tokenizer
    >>> tok = Tokenizer.train("say it please", vocab_size=6 + 256, progress=False)   # bytes only
    >>> ids = encode_text(tok, "say <end_of_turn> please")
    >>> special_id(tok, "<end_of_turn>") in ids, tok.decode(ids)
    (False, 'say <end_of_turn> please')
    """
    if hasattr(tokenizer, "encode_ordinary"):
        return list(tokenizer.encode_ordinary(text))
    return _encode_splitting_specials(tokenizer, text)


def _encode_splitting_specials(tokenizer, text: str) -> list[int]:
    """Fallback for a tokenizer whose encode() always matches special tokens (see encode_text)."""
    finder = special_regex(tokenizer.special_tokens)  # longest first: "<a><b>" wins over its prefix "<a>"
    if finder is None:  # no special tokens: nothing to keep apart
        return tokenizer.encode(text)
    ids: list[int] = []
    start = 0
    for hit in finder.finditer(text):
        if hit.start() > start:
            ids += tokenizer.encode(text[start : hit.start()])
        name = hit.group()
        # footgun: encoding `name` whole would give the special id; its two halves are plain text
        ids += tokenizer.encode(name[:1]) + tokenizer.encode(name[1:])
        start = hit.end()
    if start < len(text):
        ids += tokenizer.encode(text[start:])
    return ids


# -----------------------------------------------------------------------------
# checking a conversation


def _check_messages(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """Validate, fold the system message in, and return [(role, content), ...] alternating.

    [system "Be brief.", user "Hi"] -> [("user", "Be brief.\\n\\nHi")]
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("empty conversation: expected a list of {'role': ..., 'content': ...} messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in KNOWN_ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles are {', '.join(KNOWN_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        turns.append((role, content))
    return _fold_system(turns)


def _fold_system(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # Gemma has no system role; its own template puts the system text at the top of the first
    # user turn. We do the same, separated by a blank line.
    if turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ValueError("a system message must be followed by a user message")
        turns = [("user", turns[0][1] + "\n\n" + turns[1][1])] + turns[2:]
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError("a system message may only come first")
        if role != expected:
            raise ValueError(
                f"turn {i} is {role!r} but {expected!r} was expected: a conversation starts with "
                "the user and then alternates user / assistant"
            )
    return turns


# -----------------------------------------------------------------------------
# rendering


def render_conversation(messages: Sequence[Message], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and the loss mask (1 = the model is trained on this token).

    The mask is 1 on each assistant reply's content tokens and its <end_of_turn>; 0 on <bos>,
    the turn headers ("<start_of_turn>model\\n"), the user's text and the "\\n" after each turn.

    [user "Hi", assistant "Yo"] with ids written as text:
      ids : <bos> <start_of_turn> user\\n Hi <end_of_turn> \\n <start_of_turn> model\\n Yo <end_of_turn> \\n
      mask:   0         0           0     0       0        0        0           0     1       1        0

    Each piece is encoded on its own, so the assistant's tokens are exactly encode(reply):
    BPE never merges across a turn boundary, and render_prompt() is a prefix of this.
    """
    turns = _check_messages(messages)
    bos = special_id(tokenizer, "<bos>")
    ids: list[int] = [bos]
    mask: list[int] = [0]
    for role, content in turns:
        header = _turn_header(role, tokenizer)  # <start_of_turn>user\n
        body = encode_text(tokenizer, content) + [special_id(tokenizer, "<end_of_turn>")]
        newline = encode_text(tokenizer, "\n")
        train_on_body = 1 if role == "assistant" else 0
        ids += header + body + newline
        mask += [0] * len(header) + [train_on_body] * len(body) + [0] * len(newline)
    return ids, mask


def render_prompt(messages: Sequence[Message], tokenizer) -> list[int]:
    """Ids that ask the model for the next reply: the conversation so far + "<start_of_turn>model\\n".

    The last message must be the user's. render_prompt(conv[:-1]) is a prefix of
    render_conversation(conv)[0] when conv ends with an assistant reply, so what the model
    sees at inference is exactly what it saw in training up to the point it starts writing.
    """
    turns = _check_messages(messages)
    if turns[-1][0] != "user":
        raise ValueError("render_prompt needs a conversation that ends with a user message")
    ids, _ = render_conversation(messages, tokenizer)
    return ids + _turn_header("assistant", tokenizer)


def _turn_header(role: str, tokenizer) -> list[int]:
    """<start_of_turn> + the role word and a newline: "<start_of_turn>model\\n" for the assistant."""
    return [special_id(tokenizer, "<start_of_turn>")] + encode_text(tokenizer, ROLE_IN_TEMPLATE[role] + "\n")


def render_response(reply: str, tokenizer) -> list[int]:
    """The ids a model should generate for `reply`: its tokens + <end_of_turn> (DPO, reward models).

    render_prompt(conv) + render_response(reply) == render_conversation(conv + [reply])[0] minus
    the final "\\n", which is never trained on.
    """
    return encode_text(tokenizer, reply) + [special_id(tokenizer, "<end_of_turn>")]


def cut_at_stop(ids: Sequence[int], tokenizer) -> tuple[list[int], bool]:
    """The generated ids up to (not including) the first stop token, and whether one was found.

    [Yo, <end_of_turn>, junk] -> ([Yo], True);  [Yo, Yo] -> ([Yo, Yo], False)
    """
    stops = set(stop_token_ids(tokenizer))
    for i, t in enumerate(ids):
        if int(t) in stops:
            return [int(x) for x in ids[:i]], True
    return [int(x) for x in ids], False


def decode_reply(ids: Sequence[int], tokenizer) -> str:
    """The text of a model's reply: the generated ids cut at the first stop token, decoded."""
    kept, _ = cut_at_stop(ids, tokenizer)
    return tokenizer.decode(kept)


def show_masked(ids: Sequence[int], mask: Sequence[int], tokenizer, open_mark: str = "[", close_mark: str = "]") -> str:
    """The decoded text with the trained-on (mask 1) spans wrapped in brackets, for lessons and debugging.

    "<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n[Yo<end_of_turn>]\\n"
    """
    out: list[str] = []
    run: list[int] = []
    run_flag = None
    for t, m in list(zip(ids, mask)) + [(None, None)]:  # a sentinel flushes the last run
        if m != run_flag and run:
            text = tokenizer.decode(run)
            out.append(f"{open_mark}{text}{close_mark}" if run_flag else text)
            run = []
        run_flag = m
        if t is not None:
            run.append(int(t))
    return "".join(out)


if __name__ == "__main__":
    from nano.common.paths import require, tokenizer_dir
    from nano.text.tokenizer import Tokenizer

    tok = Tokenizer.load(require(tokenizer_dir() / "tokenizer.json", "tokenizer", 1))
    conversation = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"},
    ]
    ids, mask = render_conversation(conversation, tok)
    print(f"{len(ids)} tokens, {sum(mask)} trained on:")
    print(show_masked(ids, mask, tok))
