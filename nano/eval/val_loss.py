"""
How well a model predicts held-out text: validation loss per token, and bits per byte.

Training watches the loss on text it learns from; that number can fall for ever while the model
only memorises. The honest number is the same loss on text it never trained on (lesson 2's val bin),
scored the same way at every checkpoint: `validation_loss` reads fixed, evenly spaced windows of the
held-out tokens, so two checkpoints are compared on exactly the same text.

Loss per token depends on the tokenizer (a bigger vocabulary makes fewer, harder tokens), so we also
report bits per byte, which does not:

    bpb = loss_nats * num_tokens / (num_bytes * ln 2)

8 bits per byte is no better than random bytes; gzip reaches about 2.5 on English text.

Used by lesson 4 (pretraining's validation) and lesson 12 (every stage side by side).
Tests: tests/test_04_val_loss.py.
"""

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nano.model.generate import eval_mode


def bits_per_byte(loss_nats: float, num_tokens: int, num_bytes: int) -> float:
    """Convert a mean loss per token (nats) into bits per byte of text.

    The model spends loss_nats * num_tokens nats on the whole text; divided by ln 2 that is bits;
    divided by the text's length in bytes it is bits per byte:

        bpb = loss_nats * num_tokens / (num_bytes * ln 2)

    Unlike loss per token it does not depend on the tokenizer (a bigger vocabulary makes fewer,
    harder tokens), so models with different vocabularies compare. 8 bits/byte = no better than
    random bytes; gzip reaches ~2.5 on English.

    >>> round(bits_per_byte(math.log(2), num_tokens=10, num_bytes=5), 6)   # 10 tokens of 1 bit over 5 bytes
    2.0
    """
    if num_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return loss_nats * num_tokens / (num_bytes * math.log(2))


def token_byte_lengths(tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """How many bytes of text each token id stands for: len(tokenizer.decode_bytes([id])), 0 for specials.

    Special tokens (<bos>, <eos>, ...) mark structure, not text: they get 0 bytes, and
    `validation_loss` leaves them out of bits per byte altogether (as nanochat does).
    """
    size = vocab_size or tokenizer.vocab_size
    special_ids = set(getattr(tokenizer, "special_tokens", {}).values())
    return np.array([0 if i in special_ids else len(tokenizer.decode_bytes([i])) for i in range(size)], dtype=np.int64)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context_len: int,
    batches: int,
    batch_size: int,
    tokenizer: Any = None,
    byte_lengths: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Mean next-token loss (nats) on held-out tokens, and bits per byte: (loss, bpb).

    `tokens` is a 1-D array (a np.memmap of the val bin). The `batches * batch_size` windows of
    context_len + 1 tokens start evenly spaced over it, the same for every call, so every checkpoint
    is scored on exactly the same text.

    loss: the mean over every predicted token, as in training.
    bpb:  over the predicted tokens that are text (byte length > 0, from `byte_lengths` or else
          `token_byte_lengths(tokenizer)`), their nats / (their bytes * ln 2) — see `bits_per_byte`.
          nan when neither is given.
    """
    device = device or next(model.parameters()).device
    num_windows = batches * batch_size
    last_start = len(tokens) - context_len - 1  # each window needs context_len inputs + 1 target
    if last_start < 0:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of {context_len} + 1")
    starts = np.linspace(0, last_start, num_windows).astype(np.int64)
    if byte_lengths is None and tokenizer is not None:
        byte_lengths = token_byte_lengths(tokenizer)

    total_nats, total_tokens = 0.0, 0  # every predicted token: the loss
    text_nats, text_tokens, text_bytes = 0.0, 0, 0  # predicted tokens that are text: bits per byte
    with eval_mode(model):  # no dropout; the mode it had comes back afterwards
        for b in range(batches):
            batch_starts = starts[b * batch_size : (b + 1) * batch_size]
            rows = [np.asarray(tokens[s : s + context_len + 1], dtype=np.int64) for s in batch_starts]
            window = torch.from_numpy(np.stack(rows)).to(device)  # (B, T+1)
            inputs, targets = window[:, :-1], window[:, 1:]  # (B, T) each
            logits, _ = model(inputs)  # (B, T, V)
            # per-token losses (not a mean) so that batches and subsets add up exactly; fp32 log-softmax
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
            total_nats += nats.sum().item()
            total_tokens += nats.numel()
            if byte_lengths is not None:
                num_bytes = torch.from_numpy(byte_lengths[targets.flatten().cpu().numpy()]).to(device)  # (B*T,)
                is_text = num_bytes > 0
                text_nats += nats[is_text].sum().item()
                text_tokens += int(is_text.sum())
                text_bytes += int(num_bytes.sum())
    loss = total_nats / total_tokens
    bpb = bits_per_byte(text_nats / text_tokens, text_tokens, text_bytes) if text_bytes > 0 else float("nan")
    return loss, bpb
