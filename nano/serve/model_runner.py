"""
The model runner: one forward pass over the tokens of many sequences at once, through the paged KV cache.

nano/serve/scheduler.py decides WHICH sequences run in a step; this module runs their tokens. A step
feeds some sequences a whole prompt (prefill) and every other running sequence one token (decode),
all flattened into one batch of N tokens, each with its own position and its own cache slot. The
forward pass is nano/model/decode_step.py's (the model's own weights and formulas, in fewer operations);
what this module adds is `attend`: write each token's key and value into the pool at its slot,
then attend per group, reading keys and values through the block tables (nano/serve/kv_cache.py's
gather path on a CPU, nano/serve/paged_attention.py's Triton kernel for the decode group on a GPU).

    runner = ModelRunner(model, cache)
    logits = runner.forward([(blocks, tokens_to_feed, first_position), ...])   # (S, vocab)

Tested through tests/test_14_engine.py (greedy outputs equal generate's, token for token).
"""

import importlib.util

import torch

from nano.model.decode_step import InferenceModel, decode_attention, hidden_to_bias
from nano.serve.kv_cache import (PagedKVCache, SequenceBlocks, block_table_tensor, gather_kv, long_tensor,
                                paged_attention_reference)


class ModelRunner:
    """The model's forward pass over a flat batch of tokens from different sequences, through the paged cache.

    nano/model/gemma.py's forward assumes a rectangle (B, T) where row b's tokens sit at positions
    [pos, pos + T) for every row. Here each token has its own position and its own cache slot, so the
    runner uses nano/model/decode_step.py's flat forward (the same weights and formulas) with

        ids, positions, slots      (N,)   one entry per token fed this step
        prefill group              sequences fed several tokens: their queries padded to the longest
        decode group               sequences fed exactly one token (the last ones): one query each

    and an `attend` that writes each token's K/V into the pool at its slot, then attends per group
    through the block tables. Norms, projections and the MLP see all N tokens in one matmul each.
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache):
        self.cache, self.cfg = cache, model.cfg
        self.fast = InferenceModel(model)  # built once: a server's weights do not change
        self.device = next(model.parameters()).device
        # on a GPU the decode group uses the Triton kernel (nano/serve/paged_attention.py); elsewhere the gather path
        self.use_triton = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.bias_tables: dict[int, torch.Tensor] = {}  # window -> (L, L) key biases (`_bias_table`)
        # decode-only steps through fixed shapes and torch.compile (nano/serve/compiled_decode.py), if set
        self.padded_decode = None

    def forward(self, spans: list[tuple[SequenceBlocks, list[int], int]], soft_capped: bool = True) -> torch.Tensor:
        """Run the model over the tokens of `spans` and return next-token logits (S, vocab), fp32
        (soft_capped=False: before the final soft-cap; the engine caps only what it samples from).

        spans: (blocks, tokens to feed, position of the first one) per sequence, decode spans (one
        token) last. Each span's K/V go into its blocks; its logits are those of its last token.
        """
        cache, device = self.cache, self.device
        as_long = dict(dtype=torch.long, device=device)
        # 1. flatten: ids, positions and cache slots of every token; the decode group is the trailing
        #    run of one-token spans (a one-token PROMPT earlier on is a prefill of length 1)
        num_prefill = len(spans)
        while num_prefill > 0 and len(spans[num_prefill - 1][1]) == 1:
            num_prefill -= 1
        if num_prefill == 0 and self.padded_decode is not None and self.padded_decode.takes(len(spans)):
            return self.padded_decode(spans, soft_capped)
        ids, positions, slots, last_rows = [], [], [], []
        for blocks, tokens, start in spans:
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += cache.slot_ids(blocks, start, start + len(tokens))
            last_rows.append(len(ids) - 1)
        # one tensor, three rows (unbind() itself: unpacking goes through Tensor.__iter__, ~1 us more in Python)
        ids_t, positions_t, slots_t = long_tensor(ids + positions + slots, device).view(3, -1).unbind()
        first_decode = last_rows[num_prefill - 1] + 1 if num_prefill else 0  # row of the first decode token
        prefill = self._prefill_group(spans[:num_prefill], last_rows, positions_t) if num_prefill else None
        decode = self._decode_group(spans[num_prefill:], positions_t[first_decode:]) if num_prefill < len(spans) else None
        heads, head_dim, softcap = self.cfg.n_heads, self.cfg.head_dim, self.cfg.attn_softcap

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            w = self.fast.layers[layer]
            cache.write(layer, slots_t, k, v)  # (N, Hkv, D) each, into the pool at their slots
            key_pool, value_pool = cache.keys[layer], cache.values[layer]
            parts = []
            if prefill is not None:  # gather each prompt's queries into a padded (S, Hq, Tq, D)
                q_group = q[prefill["index"]].permute(0, 2, 1, 3)  # (S, Tq, Hq, D) -> (S, Hq, Tq, D)
                o = paged_attention_reference(q_group, key_pool, value_pool, prefill["block_tables"],
                                              prefill["query_positions"], prefill["key_lens"], w["scale"], softcap,
                                              w["window"])
                o = o.permute(0, 2, 1, 3).reshape(-1, heads * head_dim)  # (S * Tq, Hq*D), padding included
                parts.append(o[prefill["keep"]])  # the real rows, in token order
            if decode is not None:
                q_decode = q[first_decode:] if first_decode else q  # (S, Hq, D) (a slice is an operator call too)
                if self.use_triton:
                    # imported here: triton is optional and only used on a GPU
                    from nano.serve.paged_attention import paged_decode_attention

                    o = paged_decode_attention(q_decode, key_pool, value_pool, decode["block_tables"],
                                               decode["key_lens"], w["scale"], softcap, w["window"])
                    parts.append(o.reshape(-1, heads * head_dim))
                else:
                    tables, key_bias = decode["views"][w["window"]]
                    keys, values = gather_kv(cache.pools[layer], tables).unbind()  # (S, Hkv, L, D) each
                    parts.append(decode_attention(q_decode, keys, values, w["scale"], softcap, key_bias))
            return parts[0] if len(parts) == 1 else torch.cat(parts)  # (N, Hq*D)

        hidden = self.fast.forward(ids_t, positions_t, attend)  # (N, d)
        # the LM head only for the last token of each sequence (the only logits we sample from)
        if len(last_rows) < len(ids):  # (when every span is one token, every row is a last row)
            hidden = hidden[torch.tensor(last_rows, **as_long)]
        return self.fast.logits(hidden, soft_capped)  # (S, V)

    def _prefill_group(self, spans, last_rows, positions_t) -> dict:
        """Index tensors that pad the prompts' tokens into (S, Tq) and back."""
        device = self.device
        longest = max(len(tokens) for _, tokens, _ in spans)
        index, keep = [], []
        for row, (_, tokens, _) in enumerate(spans):
            first = last_rows[row] - len(tokens) + 1
            index.append([first + min(i, len(tokens) - 1) for i in range(longest)])  # padding repeats the last
            keep += [row * longest + i for i in range(len(tokens))]
        index_t = torch.tensor(index, dtype=torch.long, device=device)  # (S, Tq)
        return {"index": index_t, "keep": torch.tensor(keep, dtype=torch.long, device=device),
                "query_positions": positions_t[index_t],
                "block_tables": block_table_tensor([b.block_table for b, _, _ in spans], device),
                "key_lens": torch.tensor([s + len(t) for _, t, s in spans], dtype=torch.long, device=device)}

    def _decode_group(self, spans, positions_t, widths: dict[int, int] | None = None) -> dict:
        """Block tables and masks of this step, made once and shared by every layer with the same window.

        A window layer only needs the blocks its window touches (at most (window - 1) // block_size + 2
        of them, whatever the sequence's length): its table keeps just those columns, so it gathers
        less. Gathered key j of a sequence sits at position first_block * block_size + j; it is hidden
        past the sequence's end (the unused tail of its last block) and before the window. The
        bookkeeping is done in Python lists: a handful of tensors per step instead of dozens of ops.
        widths: a fixed number of blocks per window instead (nano/serve/compiled_decode.py's fixed shapes).
        """
        device, block_size = self.device, self.cache.block_size
        tables = [b.block_table for b, _, _ in spans]
        positions = [start for _, _, start in spans]  # each sequence's one query position
        max_blocks = max(len(t) for t in tables)
        views = {}
        for window in {w["window"] for w in self.fast.layers}:
            if widths is not None:  # fixed: from the window's first block (from block 0 on a global layer)
                width = widths[window]
            else:
                width = self.blocks_read(window) if window > 0 else max_blocks
            if widths is None and width >= max_blocks:  # the window reaches as far back as the longest table: keep it all
                first, width = [0] * len(spans), max_blocks
            else:
                first = [max(0, p - window + 1) // block_size if window > 0 else 0 for p in positions]
            # exactly `width` blocks each (block 0 pads a short table; its keys are past the end: hidden)
            window_tables = [t[f:f + width] + [0] * (width - len(t[f:f + width])) for t, f in zip(tables, first)]
            # offset: the query's index among the gathered keys; visible keys are offset - window < j <= offset,
            # and the bias row of each offset is ready-made (`_bias_table`): one gather, not a mask built anew
            offset = long_tensor([p - f * block_size for p, f in zip(positions, first)], device)
            key_bias = self._bias_table(window).narrow(1, 0, width * block_size).index_select(0, offset)  # (S, L)
            views[window] = (block_table_tensor(window_tables, device), key_bias)
        if not self.use_triton:  # the gather path needs only the views
            return {"views": views}
        return {"block_tables": block_table_tensor(tables, device), "key_lens": positions_t + 1, "views": views}

    def blocks_read(self, window: int) -> int:
        """The most blocks a query's keys span on a layer with this window: the window's reach,
        (window - 1) // block_size + 2 (it may start mid-block), or the whole context on a global one (0)."""
        block_size = self.cache.block_size
        return (window - 1) // block_size + 2 if window > 0 else -(-self.cfg.context_len // block_size)

    def _bias_table(self, window: int) -> torch.Tensor:
        """Row o: decode_attention's key bias for a query at gathered index o, made once per window.

        -inf where key j is past the query (j > o) or, on a window layer, before its window
        (j <= o - window); 0 elsewhere. Its size covers every gathered length: the context rounded up
        to whole blocks, or a window layer's `width` blocks.
        """
        if window not in self.bias_tables:
            j = torch.arange(self.blocks_read(window) * self.cache.block_size, device=self.device)
            hidden = j[None, :] > j[:, None]  # (L, L): [o, j]
            if window > 0:
                hidden |= j[None, :] <= j[:, None] - window
            self.bias_tables[window] = hidden_to_bias(hidden)
        return self.bias_tables[window]
