"""
Padding: token lists of different lengths made into one (B, T) tensor, the shape a model takes.

The rows of a batch are rarely the same length, so the short ones are filled up with a pad id
(<pad>, 0 with nano's tokenizer: nano/text/chat_format.py: pad_token_id). The pads are never read as text:
a mask or a length says where each row's real tokens are. Which side the pads go depends on what
runs next:

    right_pad   <bos> a b c <pad> <pad>     training and scoring (reward model, DPO, RL): causal
                <bos> d e f  g     h        attention means a real token never looks at the pads
                                            after it, and the loss or the response mask skips them
    left_pad    <pad> <pad> <bos> a b c     generation: every row's last prompt token sits in the
                <bos> d e f  g     h        last column, so one step's logits[:, -1] is every row's
                                            next-token prediction (nano/model/generate.py: generate_batch)

(Supervised fine-tuning pads on the right too, targets with -100 alongside: nano/text/bins.py: sft_batch.)
"""

from typing import Sequence

import numpy as np
import torch


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (ids (B, T), lengths (B,)).

    >>> right_pad([[5, 6, 7], [8]])
    (tensor([[5, 6, 7],
            [8, 0, 0]]), tensor([3, 1]))
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return ids.to(device), lengths.to(device)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad prompts on the LEFT to one length: (ids (B, T), key_mask (B, T), True on real tokens).

    Left, not right: every row's last prompt token then sits in the last column, so one step's
    logits[:, -1] is the next-token prediction of every row, and new tokens are appended in step.

    >>> ids, mask = left_pad([[5, 6, 7], [8]])
    >>> ids.tolist(), mask.int().tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    key_mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt) > 0:
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            key_mask[row, longest - len(prompt) :] = True
    return ids, key_mask
