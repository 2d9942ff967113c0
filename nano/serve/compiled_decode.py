"""
The engine's decode step in a few fixed shapes, so that torch.compile can turn it into C++ loops.

On a CPU, an eager decode step of a small model is mostly per-operation overhead: ~300 PyTorch calls,
each a few microseconds of Python and dispatch, around matrix products that take less (lesson 14,
sections 10 and 11). torch.compile's CPU backend (Inductor) traces a function once and writes it as
a few fused C++ loops, but only for inputs that look the same every call: a new shape means a new
trace and a new compile (tens of seconds). An engine's decode step changes shape at every step (how
many sequences run, how many blocks the longest one has), so, as vLLM does for its CUDA graphs,
the step is PADDED to one of a few fixed shapes:

    sequences     S -> the next bucket, 1, 2, 4, 8, ...: the extra rows are a dummy sequence whose
                  keys and values go into a scratch block that no sequence ever owns
    blocks        every sequence's table is as wide as the whole context (global layers) or as
                  the window can reach (sliding layers): keys past a sequence's end are hidden by
                  decode_attention's additive bias, as they already are in the eager gather path
    RoPE          the table for every position is made once (no length check read from a tensor)

so there is one compiled graph per bucket, made the first time a step of that size runs. The
arithmetic is the eager path's (nano/serve/model_runner.py), ops for ops; Inductor fuses and
reorders the elementwise ones, so logits differ in the last bits and a greedy near-tie can flip
(bench/verify_gguf_llamacpp.py --compiled counts the tokens that agree). Prefill steps, and steps
mixing prompts with decoding, stay eager: their shapes vary the most, and they are few.

    decode = PaddedDecode(runner, compile=True)      # Engine(model, compile_decode=True) does this
    logits = decode(spans, soft_capped=False)        # spans all one token each -> (S, vocab)

compile=False runs the same padded step eagerly: what tests/test_14_engine.py checks against the
engine's own path (same greedy tokens, logits within rounding).
"""

from __future__ import annotations

import shutil

import torch

from nano.model.decode_step import InferenceModel, decode_attention
from nano.serve.kv_cache import SequenceBlocks, gather_kv, long_tensor, write_kv


def bucket(num_seqs: int) -> int:
    """The padded batch size: the next power of two, so a handful of shapes cover any batch.

    >>> [bucket(s) for s in (1, 2, 3, 5, 16, 17)]
    [1, 2, 4, 8, 16, 32]
    """
    return 1 << (num_seqs - 1).bit_length()


class FixedShapeDecode(InferenceModel):
    """InferenceModel's forward over the paged cache, with every tensor it takes in a fixed shape.

        logits = step(ids, positions, slots (S,), tables [one (S, width) per window],
                      biases [one (S, width * block_size) per window], pools [one per layer])

    tables and biases follow `windows` (the distinct sliding windows of the layers, 0 = global).
    """

    def __init__(self, model: torch.nn.Module, windows: list[int], soft_capped: bool):
        super().__init__(model, full_rope_table=True)
        self.window_index = {window: i for i, window in enumerate(windows)}
        self.soft_capped = soft_capped

    def __call__(self, ids, positions, slots, tables, biases, pools) -> torch.Tensor:
        softcap = self.cfg.attn_softcap

        def attend(layer: int, q, k, v):
            w = self.layers[layer]
            i = self.window_index[w["window"]]
            write_kv(pools[layer].view(2, -1, *k.shape[1:]), slots, k, v)  # the new key and value, at their slot
            keys, values = gather_kv(pools[layer], tables[i]).unbind()  # (S, Hkv, width * block_size, D) each
            return decode_attention(q, keys, values, w["scale"], softcap, biases[i])

        return self.logits(self.forward(ids, positions, attend), self.soft_capped)


class PaddedDecode:
    """Decode-only steps of a ModelRunner, padded to a bucket and run through FixedShapeDecode.

    max_batch: the biggest bucket it takes (bigger batches stay eager). Measured here (`tiny`, one
    thread, 128 tokens per sequence, the engine's tokens/s compiled against eager, same run):
    1.9-3x at 1 sequence, 1.1-1.5x at 16, 0.84x at 64, where the arithmetic is most of a step and
    the padding (every table as wide as the context) costs more than the fused loops save.
    """

    def __init__(self, runner, compile: bool = True, max_batch: int = 16):
        self.runner, self.cache = runner, runner.cache
        # distinct windows, and how many blocks each layer kind reads: the window's reach, or the context
        self.windows = sorted({w["window"] for w in runner.fast.layers})
        self.widths = {w: min(runner.blocks_read(w), runner.blocks_read(0)) for w in self.windows}
        if compile and runner.device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            raise RuntimeError("compile_decode needs a C++ compiler on PATH (torch.compile's CPU backend "
                               "writes C++ and builds it): install g++, or leave compile_decode off")
        # the padding rows' block: taken from the pool for good (/stats shows it as "scratch"); a padding
        # row is a dummy sequence feeding token 0 at position 0 of it, and seeing that one key
        self.scratch_block = self.cache.allocator.allocate()
        self.padding_span = (SequenceBlocks([self.scratch_block]), [0], 0)
        self.compile, self.max_batch = compile, max_batch
        self.buckets_seen: set[int] = set()  # (compiled: one graph each)
        self.steps = {}  # soft_capped -> the step (compiled: one graph per bucket, made on first use)

    def takes(self, num_seqs: int) -> bool:
        return bucket(num_seqs) <= self.max_batch

    def step_for(self, soft_capped: bool):
        if soft_capped not in self.steps:
            step = FixedShapeDecode(self.runner.fast.model, self.windows, soft_capped)
            # dynamic=False: one graph per bucket, each specialised to its shapes; cpp_wrapper: the
            # kernels are called from C++, without a Python line between two of them
            self.steps[soft_capped] = torch.compile(step, dynamic=False, options={"cpp_wrapper": True}) \
                if self.compile else step
        return self.steps[soft_capped]

    def inputs(self, spans) -> tuple:
        """The step's tensors for these decode spans, padded to bucket(len(spans)) rows."""
        padded = bucket(len(spans))
        self.buckets_seen.add(padded)
        spans = spans + [self.padding_span] * (padded - len(spans))
        device = self.runner.device
        positions = long_tensor([start for _, _, start in spans], device)
        slots = [self.cache.slot_ids(blocks, start, start + 1)[0] for blocks, _, start in spans]
        # the block tables and key biases of the eager path (ModelRunner._decode_group), at fixed widths
        views = self.runner._decode_group(spans, positions, self.widths)["views"]
        return (long_tensor([tokens[0] for _, tokens, _ in spans], device), positions, long_tensor(slots, device),
                [views[w][0] for w in self.windows], [views[w][1] for w in self.windows], self.cache.pools)

    def __call__(self, spans, soft_capped: bool = True) -> torch.Tensor:
        return self.step_for(soft_capped)(*self.inputs(spans))[:len(spans)]  # (S, vocab): the padding dropped
