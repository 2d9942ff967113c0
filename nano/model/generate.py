"""
Generation: turn next-token logits into text, one token at a time, with a KV cache.

A language model only scores the next token. To write, we loop: run the model, pick a token from its
last logits, append it, repeat. Run naively, step t recomputes attention over all t tokens again —
O(T^2) work for T tokens. The KV cache keeps every layer's keys and values of the tokens already seen,
so after one "prefill" pass over the prompt each step feeds ONE new token (the "decode" phase).
Greedy decoding with and without the cache gives the same tokens; only the cost differs.

How a token is picked (`sample_next`), in this order, as in Hugging Face's generate:
    temperature 0 -> argmax (greedy); else logits / temperature,
    top-k  (Fan et al. 2018): keep the k highest logits,
    top-p  (Holtzman et al. 2019, "nucleus"): keep the fewest tokens whose probabilities sum to >= p,
    then draw from softmax of what is left.

    from nano.model.generate import generate
    new_ids = generate(model, tokenizer.encode("Once upon a time"), max_new_tokens=50, temperature=0.8, top_k=40, seed=0)

Tests: `make check-13` (or `.venv/bin/python -m pytest -q tests/test_13_generate.py`).
"""

import functools
from contextlib import contextmanager
from typing import Any, Callable, Container, Iterable, Iterator, Sequence

import torch

from nano.text.padding import left_pad
from nano.model.attention import soft_cap
from nano.model.decode_step import decode_step
from nano.model.gemma import GemmaNano

# -----------------------------------------------------------------------------------------------
# 1. Choosing the next token
# -----------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the others to -inf. logits: (..., V).

    Ties with the k-th value are all kept (a threshold, not an index list), so no token is dropped
    just for coming later in the vocabulary.

    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
    tensor([-inf, 3., 2., -inf])
    """
    if k <= 0:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability sums to >= p. logits: (..., V).

    Sort by probability, add up; a token is kept when the mass BEFORE it is still < p, so the token
    that crosses p is kept and the top token always is.

    >>> probs = torch.tensor([0.5, 0.3, 0.15, 0.05])      # p = 0.7: 0.5 (0 before) and 0.3 (0.5 before) stay
    >>> top_p_filter(probs.log(), 0.7).exp()
    tensor([0.5000, 0.3000, 0.0000, 0.0000])
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (..., V): probability of the tokens ahead
    remove_sorted = mass_before >= p
    # undo the sort: scatter the "remove" flags back to vocabulary order
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The logits `sample_next` draws from: logits (B, V) / temperature, then top-k and top-p
    (-inf where they filtered). Their softmax is the sampling distribution."""
    if temperature <= 0.0:
        raise ValueError("temperature 0 is greedy decoding: it has no distribution to draw from")
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """The distribution `sample_next` draws from, as log-probabilities: logits (B, V) -> (B, V).

    RL needs these exact numbers: the log-prob of a sampled token is its log-prob under THIS
    distribution, not under the model's untempered softmax (nano/align/logprobs.py: response_logprobs
    takes the temperature).

    >>> sampling_logprobs(torch.tensor([[2.0, 0.0]]), temperature=0.5).exp()   # softmax([4, 0])
    tensor([[0.9820, 0.0180]])
    """
    return torch.log_softmax(sampling_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V) -> ids (B,).

    temperature 0 (or below) is greedy: the argmax, no randomness. Otherwise the logits are divided
    by the temperature (< 1 sharpens, > 1 flattens), filtered by top-k then top-p (`sampling_logits`),
    and one token is drawn from their softmax with `generator` (seeded, for reproducible samples).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(sampling_logits(logits, temperature, top_k, top_p), dim=-1)  # (B, V), zeros where filtered
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def greedy_capped(raw_logits: torch.Tensor, cap: float, k: int = 4) -> torch.Tensor:
    """argmax(soft_cap(raw_logits, cap)) per row (B, V) -> (B,), without soft-capping every logit.

    The soft-cap, cap * tanh(x / cap), costs a tanh per vocabulary entry: at 64 rows of 4,096 more
    than the argmax and the LM head together. It never changes the order of two logits, so the
    winner is among the k largest raw ones; only there is it applied. One subtlety keeps this exact:
    tanh can map two different raw values to the SAME float (it flattens towards +-cap), and then
    argmax takes the first index of the tie. So the first index among the top k whose capped value
    equals the best is taken, and a row whose k-th capped value still ties the best (the tie may go
    on past k) is capped in full.
    """
    values, indices = raw_logits.topk(k, dim=-1)  # (B, k), largest first
    capped = soft_cap(values, cap)
    best = capped[:, :1]
    tokens = torch.where(capped == best, indices, raw_logits.shape[-1]).min(dim=-1).values  # first index of the tie
    unsure = (capped[:, -1] == best[:, 0]).nonzero().flatten()
    if len(unsure):
        tokens[unsure] = soft_cap(raw_logits[unsure], cap).argmax(dim=-1)
    return tokens


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device` (None: use torch's global random state)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`with eval_mode(model):` runs the block with the model in eval mode (no dropout), then gives it
    back the mode it had — also when the block raises, which a hand-written model.eval() ...
    model.train() pair forgets (a Ctrl-C during an evaluation would leave dropout off for good).

    >>> layer = torch.nn.Dropout(0.5).train()
    >>> with eval_mode(layer):
    ...     layer.training
    False
    >>> layer.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def in_eval_mode(fn: Callable) -> Callable:
    """Decorator: run fn(model, ...) inside eval_mode(model).

    RL lessons generate in the middle of training; they get their training mode back afterwards.
    """

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args, **kwargs):
        with eval_mode(model):
            return fn(model, *args, **kwargs)

    return wrapper


# -----------------------------------------------------------------------------------------------
# 2. When to stop
# -----------------------------------------------------------------------------------------------


def is_looping(tokens: Sequence[int], window: int) -> bool:
    """The repetition stop: are the last `window` tokens one block of tokens repeated 3+ times?

    The tail is "periodic with period L" when tail[i] == tail[i + L] for every i; we try every
    L <= window // 3, so a block must occur at least three times in a row. window = 0 turns it off.
    Small models fall into such loops ("the cat. the cat. the cat.") and never leave them; stopping
    there saves the rest of max_new_tokens.

    >>> is_looping([7, 1, 2, 1, 2, 1, 2], window=6), is_looping([1, 2, 3, 1, 2, 4], window=6)
    (True, False)
    """
    if window <= 0 or len(tokens) < window:
        return False
    tail = list(tokens[-window:])
    for period in range(1, window // 3 + 1):
        if all(tail[i] == tail[i + period] for i in range(window - period)):
            return True
    return False


def stop_reason(
    tokens: Sequence[int],
    length: int,
    max_length: int | None,
    max_new_tokens: int,
    stop_tokens: Container[int] = (),
    repetition_stop: int = 0,
    should_stop: Callable[[Sequence[int]], bool] | None = None,
    reply_start: int = 0,
) -> str | None:
    """The one rule that says when a reply stops: called after each new token is appended, it returns
    why the sequence stops now, or None if it goes on.

    tokens: the sequence, ending with the token just appended; tokens[reply_start:] is the reply
    (reply_start 0: `tokens` is the reply alone). The rules, in this order, the first that holds wins:

        "stop_token"      the new token is in `stop_tokens` (it stays the reply's last id, so the
                          caller can see why it stopped)
        "max_new_tokens"  the reply has `max_new_tokens` tokens
        "repetition"      the reply's last `repetition_stop` tokens loop (`is_looping`; 0 = off)
        "should_stop"     the caller's predicate, given the reply, says so
        "max_length"      length >= max_length: the sequence fills the context (None = no limit).
                          We stop there rather than slide the window: the model never saw longer sequences

    `length` is the sequence's length as the caller measures it, because the callers measure
    different things: `generate` the conversation in its cache, `generate_batch` the padded batch
    (the same for every row, so every row stops at once), the engine (nano/serve/engine.py) its own
    token list. A server maps the reason to OpenAI's finish_reason ("stop" or "length").

    >>> stop_reason([4, 2], length=9, max_length=64, max_new_tokens=10, stop_tokens={2})
    'stop_token'
    >>> stop_reason([4, 5], length=64, max_length=64, max_new_tokens=10), stop_reason([4, 5], 9, 64, 10)
    ('max_length', None)
    """
    num_new = len(tokens) - reply_start
    if tokens[-1] in stop_tokens:
        return "stop_token"
    if num_new >= max_new_tokens:
        return "max_new_tokens"
    # only the reply's own tokens may loop: the window must fit inside it (is_looping: "shorter than the window")
    if repetition_stop > 0 and num_new >= repetition_stop and is_looping(tokens[-repetition_stop:], repetition_stop):
        return "repetition"
    if should_stop is not None and should_stop(tokens if reply_start == 0 else tokens[reply_start:]):
        return "should_stop"
    if max_length is not None and length >= max_length:
        return "max_length"
    return None


def context_len_of(model: torch.nn.Module) -> int | None:
    """The longest sequence the model was trained on (model.cfg.context_len), or None if unknown."""
    return getattr(getattr(model, "cfg", None), "context_len", None)


def _crop_prompt(prompt_ids: Sequence[int], context_len: int | None) -> list[int]:
    """Keep the last context_len - 1 tokens of a too-long prompt (so one new token still fits)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("generation needs a prompt of at least one token (e.g. <bos>)")
    if context_len is not None and len(prompt_ids) > context_len - 1:
        return prompt_ids[-(context_len - 1) :]
    return prompt_ids


# -----------------------------------------------------------------------------------------------
# 3. One sequence
# -----------------------------------------------------------------------------------------------


def next_logits(model: torch.nn.Module, ids: torch.Tensor, kv_cache) -> torch.Tensor:
    """Feed one new token per row, ids (B, 1), into `kv_cache` -> next-token logits (B, 1, V).

    A tiny model's decode step costs per-operation overhead, not arithmetic, so GemmaNano's decode
    step (nano/model/decode_step.py) computes the forward's numbers in ~5x fewer operations, for
    left-padded batches too. It covers the plain case: no gradients, no autocast, not being compiled.
    Anything else takes the model's own forward.
    """
    if (isinstance(model, GemmaNano) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(ids.device.type)):
        return decode_step(model, ids, kv_cache)
    return model(ids, kv_cache=kv_cache)[0]


@torch.inference_mode()  # no_grad, and lighter: no version counters or views tracked (~15% per token here)
@in_eval_mode
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], Any] | None = None,
    repetition_stop: int = 0,
    kv_cache: Any = None,
) -> list[int]:
    """Continue `prompt_ids` with up to `max_new_tokens` new tokens; return the new ones.

    Stops early (`stop_reason`, after appending it) at a token in `stop_tokens` (so the caller can see
    why it stopped: the last id is the stop token); when the last `repetition_stop` tokens loop (see
    `is_looping`; 0 = off); or when the sequence fills the model's context (cfg.context_len) or the
    given cache: we stop there rather than slide the window, because the model never saw longer
    sequences. A prompt longer than context_len - 1 keeps only its last context_len - 1 tokens.

    use_cache=True: one prefill pass over the prompt fills the KV cache, then each step feeds the
    one new token. use_cache=False recomputes the whole sequence every step (the slow baseline;
    greedy output is identical). `on_token(id)` is called for every returned id as soon as it is
    chosen (streaming).

    kv_cache (multi-turn chat): a cache that already holds the conversation so far (kv_cache.pos
    tokens); `prompt_ids` are only the tokens to add. On return the cache holds those plus every
    returned token except the last one, which was chosen but never fed in: put it at the start of
    the next call's prompt_ids.
    """
    device = next(model.parameters()).device
    context_len = context_len_of(model)
    stop_set = {int(t) for t in stop_tokens}
    generator = make_generator(seed, device)
    prompt_ids = _crop_prompt(prompt_ids, context_len)
    new_tokens: list[int] = []

    def pick(logits: torch.Tensor) -> int:
        return int(sample_next(logits, temperature, top_k, top_p, generator)[0])

    def finished(length: int, max_length: int | None) -> bool:
        """After appending a token: is this sequence done? `length` = the sequence so far, that token included."""
        return stop_reason(new_tokens, length, max_length, max_new_tokens, stop_set, repetition_stop) is not None

    if kv_cache is not None and not use_cache:
        raise ValueError("kv_cache was given with use_cache=False: pass one or the other")
    if max_new_tokens <= 0:
        return new_tokens

    if not use_cache:
        # the baseline: every step runs the model over the full sequence so far, O(T^2) in total
        sequence = list(prompt_ids)
        while True:
            logits, _ = model(torch.tensor([sequence], device=device))  # (1, T, V)
            token = pick(logits[:, -1])
            new_tokens.append(token)
            sequence.append(token)
            if on_token is not None:
                on_token(token)
            if finished(len(sequence), context_len):
                return new_tokens

    # 1. prefill: the whole prompt in one pass; its K/V land in the cache
    if kv_cache is None:
        cache_len = len(prompt_ids) + max_new_tokens
        if context_len is not None:
            cache_len = min(context_len, cache_len)
        kv_cache = model.new_kv_cache(1, cache_len)
    if kv_cache.pos + len(prompt_ids) > kv_cache.max_len:
        raise ValueError(
            f"the KV cache holds {kv_cache.max_len} tokens: {kv_cache.pos} used + {len(prompt_ids)} new do not fit "
            "(start a new conversation)"
        )
    logits, _ = model(torch.tensor([prompt_ids], device=device), kv_cache=kv_cache)  # (1, T, V)
    # the cache has room for kv_cache.max_len tokens, so it holds a sequence of max_len + 1: the last
    # token is chosen but never fed. The sequence may grow to that, or to the context, whichever is less.
    room = kv_cache.max_len + 1
    max_length = room if context_len is None else min(context_len, room)
    # 2. decode: pick a token from the last logits, feed only that token, repeat
    while True:
        token = pick(logits[:, -1])
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if finished(kv_cache.pos + 1, max_length):  # kv_cache.pos + 1: the whole conversation, this token included
            return new_tokens
        logits = next_logits(model, torch.tensor([[token]], device=device), kv_cache)  # (1, 1, V)


# -----------------------------------------------------------------------------------------------
# 4. A batch of sequences
# -----------------------------------------------------------------------------------------------


@torch.inference_mode()
@in_eval_mode
def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    repetition_stop: int = 0,
    should_stop: Callable[[list[int]], bool] | None = None,
    pad_id: int = 0,
    return_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """`generate` for several prompts at once, with one KV cache for the batch; returns each row's new ids.

    The prompts are left-padded (`left_pad`) and the padding is hidden from attention by key_mask,
    which the cache remembers for the decode steps. RoPE makes attention depend only on relative
    positions, so a row shifted right by its padding computes what it would alone: greedy outputs
    equal those of `generate` one prompt at a time. (Sampled outputs differ: the rows share one
    random stream.) Each row stops on its own (`stop_reason`) — at a stop token (kept as its last id),
    at max_new_tokens, in a loop (`repetition_stop`), or when `should_stop(row_new_ids)` says so — and
    finished rows are fed padding until the whole batch is done. The context limit is the same as
    `generate`'s, measured on the longest prompt (the padded length), so it ends every row at once.

    return_logprobs=True (sampling only) also returns, for every new id, its log-prob under the
    distribution it was drawn from (`sampling_logprobs`): the numbers an RL loss must reproduce.
    """
    device = next(model.parameters()).device
    context_len = context_len_of(model)
    stop_set = {int(t) for t in stop_tokens}
    generator = make_generator(seed, device)
    prompts = [_crop_prompt(p, context_len) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    drawn_logprobs: list[list[float]] = [[] for _ in prompts]  # filled only with return_logprobs
    if return_logprobs and temperature <= 0.0:
        raise ValueError("return_logprobs needs sampling (temperature > 0): greedy picks have no distribution")
    if max_new_tokens <= 0 or not prompts:
        return (outputs, drawn_logprobs) if return_logprobs else outputs

    # 1. prefill every prompt at once, left-padded
    ids, key_mask = left_pad(prompts, pad_id)  # (B, T) each
    ids, key_mask = ids.to(device), key_mask.to(device)
    batch, prompt_len = ids.shape
    cache_len = prompt_len + max_new_tokens if context_len is None else min(context_len, prompt_len + max_new_tokens)
    kv_cache = model.new_kv_cache(batch, cache_len)
    logits, _ = model(ids, kv_cache=kv_cache, key_mask=key_mask)  # (B, T, V)
    done = [False] * batch

    # 2. decode, one token per row per step
    while True:
        next_tokens = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if return_logprobs:  # the same distribution sample_next drew from, at the drawn ids
            picked = sampling_logprobs(logits[:, -1], temperature, top_k, top_p).gather(-1, next_tokens[:, None])
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            if return_logprobs:
                drawn_logprobs[row].append(float(picked[row]))
            # the same context rule as `generate`, measured on the padded sequence (kv_cache.pos + 1,
            # equal for every row): the rows still going all reach it at once
            if stop_reason(outputs[row], kv_cache.pos + 1, context_len, max_new_tokens, stop_set, repetition_stop,
                           should_stop) is not None:
                done[row] = True
        if all(done):
            return (outputs, drawn_logprobs) if return_logprobs else outputs
        # finished rows are fed <pad>: their results are ignored, and rows never see each other
        feed = torch.tensor([[pad_id] if done[row] else [outputs[row][-1]] for row in range(batch)], device=device)
        logits = next_logits(model, feed, kv_cache)  # (B, 1, V)


# -----------------------------------------------------------------------------------------------
# 5. Printing a stream of tokens safely
# -----------------------------------------------------------------------------------------------


def _utf8_sequence_length(lead_byte: int) -> int:
    """How many bytes a UTF-8 character has, read from its first byte (0 for a continuation byte).

    0xxxxxxx -> 1 (ASCII), 110xxxxx -> 2, 1110xxxx -> 3, 11110xxx -> 4, 10xxxxxx -> 0 (not a start).
    """
    if lead_byte < 0x80:
        return 1
    if lead_byte >> 5 == 0b110:
        return 2
    if lead_byte >> 4 == 0b1110:
        return 3
    if lead_byte >> 3 == 0b11110:
        return 4
    return 0


def complete_prefix_length(buffer: bytes) -> int:
    """Bytes of `buffer` that can be decoded now: all but an unfinished character at its very end.

    A byte-level BPE token may end in the middle of a character: "😀" is F0 9F 98 80 and a token may
    hold only F0 9F. We look back at most 3 bytes for the start of the last character; if it needs
    more bytes than are there, it waits.

    >>> complete_prefix_length("hi😀".encode()[:4]), complete_prefix_length("hi😀".encode())
    (2, 6)
    """
    for back in range(1, min(4, len(buffer)) + 1):
        needed = _utf8_sequence_length(buffer[-back])
        if needed == 0:
            continue  # a continuation byte: the start is further back
        return len(buffer) - back if needed > back else len(buffer)
    return len(buffer)  # no start byte in the last 4: invalid bytes, let decode replace them


class StreamDecoder:
    """Token ids in, printable text out, never splitting a character.

        decoder = StreamDecoder(tokenizer)
        for token in tokens:
            print(decoder.feed(token), end="", flush=True)
        print(decoder.flush())

    `feed` returns the text completed so far (often "", while a character is still half-received);
    `flush` returns the rest (any truly broken bytes become U+FFFD only there). Special tokens
    (<end_of_turn>, ...) are skipped unless skip_special=False.
    """

    def __init__(self, tokenizer: Any, skip_special: bool = True):
        self.tokenizer = tokenizer
        special = getattr(tokenizer, "special_tokens", {}) or {}
        self.skip_ids = set(special.values()) if skip_special else set()
        self.pending = b""  # bytes of an unfinished character

    def feed(self, token_ids: int | Sequence[int]) -> str:
        """Add one token id (or several); return the text that is now complete."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.pending += self.tokenizer.decode_bytes([t for t in ids if t not in self.skip_ids])
        ready = complete_prefix_length(self.pending)
        text = self.pending[:ready].decode("utf-8", errors="replace")
        self.pending = self.pending[ready:]
        return text

    def flush(self) -> str:
        """The held-back bytes, decoded as they are (the stream ended)."""
        text = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return text
