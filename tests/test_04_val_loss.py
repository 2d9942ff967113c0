"""
Exercise (lesson 4): write `nano/eval/val_loss.py`, how well a model predicts held-out text.

Implement
  - `bits_per_byte(loss_nats, num_tokens, num_bytes)`: loss * tokens / (bytes * ln 2),
  - `token_byte_lengths(tokenizer)`: the bytes of text behind each token id, 0 for special tokens,
  - `validation_loss(model, tokens, context_len, batches, batch_size, ...)`: the mean loss over
    evenly spaced windows of held-out tokens, and bits per byte over the tokens that are text.
"""

import math

import numpy as np
import pytest
import torch

from adapters import impl

val_loss = impl("val_loss")


# ---- validation loss and bits per byte -----------------------------------------------------------


class UniformModel(torch.nn.Module):
    """A toy 'model' whose logits are all zero: every next token has probability 1/V, loss = ln V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so the device can be read from a parameter

    def forward(self, idx, targets=None, kv_cache=None, key_mask=None):
        return torch.zeros(*idx.shape, self.vocab_size), None


def test_bits_per_byte_arithmetic():
    # 1 bit per token (ln 2 nats), 10 tokens, 5 bytes -> 2 bits per byte
    assert val_loss.bits_per_byte(math.log(2), num_tokens=10, num_bytes=5) == pytest.approx(2.0)
    assert val_loss.bits_per_byte(2.0, num_tokens=3, num_bytes=4) == pytest.approx(2.0 * 3 / (4 * math.log(2)))


def test_validation_loss_on_a_uniform_toy():
    vocab = 8
    tokens = np.arange(100, dtype=np.uint16) % vocab
    # token i decodes to byte_lengths[i] bytes; token 0 is a special token (no text)
    byte_lengths = np.array([0, 2, 3, 4, 1, 2, 3, 4])
    loss, bpb = val_loss.validation_loss(UniformModel(vocab), tokens, context_len=10, batches=2, batch_size=3, byte_lengths=byte_lengths)
    assert loss == pytest.approx(math.log(vocab))  # every token costs ln 8 nats = 3 bits
    # the 6 windows start evenly spaced in [0, 100 - 11]; their targets are tokens[s+1 : s+11]
    starts = np.linspace(0, 100 - 11, 6).astype(int)
    targets = np.concatenate([tokens[s + 1 : s + 11] for s in starts])
    text_targets = targets[byte_lengths[targets] > 0]  # the special token counts neither bits nor bytes
    assert len(text_targets) < len(targets)
    assert bpb == pytest.approx(3.0 * len(text_targets) / byte_lengths[text_targets].sum())
    with pytest.raises(ValueError, match="too few"):
        val_loss.validation_loss(UniformModel(vocab), tokens[:5], context_len=10, batches=1, batch_size=1)


def test_validation_loss_matches_the_models_own_loss():
    model_mod = impl("gemma")
    torch.manual_seed(0)
    model = model_mod.GemmaNano(model_mod.model_config("tiny", vocab_size=64, context_len=16, d_model=32, n_layers=2,
                                                      n_heads=2, head_dim=16, d_ff=64, sliding_window=8,
                                                      query_pre_attn_scalar=16.0, attn_impl="eager"))
    tokens = torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(1)).numpy()
    loss, bpb = val_loss.validation_loss(model, tokens, context_len=16, batches=1, batch_size=1)
    window = torch.from_numpy(tokens.astype(np.int64))[None]
    _, reference = model(window[:, :-1], window[:, 1:])
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    assert math.isnan(bpb)  # no tokenizer, no byte lengths: bits per byte is unknown




def test_token_byte_lengths():
    tokenizer = impl("tokenizer").Tokenizer.train("Once upon a time there was a little cat. " * 20, vocab_size=270)
    lengths = val_loss.token_byte_lengths(tokenizer)
    assert len(lengths) == tokenizer.vocab_size
    for name, token_id in tokenizer.special_tokens.items():
        assert lengths[token_id] == 0, f"{name} is structure, not text: 0 bytes"
    ids = tokenizer.encode("Once upon a time there was a little cat.")
    assert lengths[ids].sum() == len("Once upon a time there was a little cat.".encode())
