"""
Training speed on this CPU: Gemma-2 Nano against a plain multi-head GPT of the same width, depth and context.

One training step = forward + backward + AdamW step on a batch of random tokens, fp32. Both models
are timed in the same run, alternating step by step, so a neighbour loading the shared CPU slows
both alike; the table reports the median step and the median ratio of neighbouring steps. The
baseline is a classic GPT-2-style model (learned positions, LayerNorm, GELU MLP of 4 d, multi-head
attention through PyTorch's fused `scaled_dot_product_attention`, tied embeddings, no biases),
written compactly below. Gemma's attention cannot use that fused call -- its soft-cap sits between
the scores and the softmax -- so it runs nano.model.attention's blockwise path instead.

    .venv/bin/python bench/bench_model.py                 # tiny and nano, eager (~1-2 minutes)
    .venv/bin/python bench/bench_model.py --compile       # adds torch.compile for both (slow to compile)
    .venv/bin/python bench/bench_model.py --models tiny --steps 10
    .venv/bin/python bench/bench_model.py --models tiny --breakdown   # where a step's time goes, piece by piece
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)
from nano.model.attention import attention  # noqa: E402
from nano.model.gemma import (DecoderLayer, GemmaNano, apply_rope, model_config, rope_cos_sin,  # noqa: E402
                        softcapped_cross_entropy)

# batch per step for each preset: about 2k tokens, enough to keep the matmuls efficient
BATCH = {"tiny": 8, "nano": 4}


# --------------------------------------------------------------------------------------------------
# the baseline: a plain GPT (nanoGPT's shape) with multi-head attention through SDPA


class GPTBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # every head has its own K and V (MHA)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc, self.fc_out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused: no T x T scores kept
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPTBaseline(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, n_layers: int, n_heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(GPTBlock(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def baseline_for(preset: str) -> GPTBaseline:
    cfg = model_config(preset)
    # same width, depth, context and number of query heads; the head width is d / heads, as in GPT
    return GPTBaseline(cfg.vocab_size, cfg.context_len, cfg.d_model, cfg.n_layers, cfg.n_heads)


# --------------------------------------------------------------------------------------------------
# timing


def make_step(model: nn.Module, batch: int, context: int, vocab: int, compile_model: bool):
    """A function doing one forward + backward + AdamW step on fixed random tokens."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, context), generator=gen)
    targets = torch.randint(0, vocab, (batch, context), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)
    forward = torch.compile(model) if compile_model else model

    def step() -> float:
        _, loss = forward(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_pair(steps: dict, num_steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the models step by step; return each one's seconds per step, in order."""
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(num_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def breakdown(preset: str, repeats: int) -> None:
    """Forward + backward time of each piece of one layer (and of the head), Gemma against GPT.

    The pieces run alone on the preset's activation shapes, alternating, `repeats` times (median).
    "per step" multiplies by how often a training step runs the piece (n_layers, or once).
    """
    cfg = model_config(preset, attn_impl="eager")
    batch, seq, d = BATCH.get(preset, 4), cfg.context_len, cfg.d_model
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, requires_grad=True)

    x, heads, hd = rand(batch, seq, d), cfg.n_heads, cfg.head_dim
    q, k, v = rand(batch, heads, seq, hd), rand(batch, cfg.n_kv_heads, seq, hd), rand(batch, cfg.n_kv_heads, seq, hd)
    q_mha, k_mha, v_mha = (rand(batch, heads, seq, d // heads) for _ in range(3))
    cos, sin = rope_cos_sin(torch.arange(seq), hd, cfg.rope_theta)
    gemma_layers = [DecoderLayer(cfg, 0), DecoderLayer(cfg, 1)]  # a window layer and a global one
    gpt_block = GPTBlock(d, heads)
    hidden, targets = rand(batch * seq, d), torch.randint(0, cfg.vocab_size, (batch * seq,), generator=gen)
    embedding = rand(cfg.vocab_size, d)
    L = cfg.n_layers
    # (piece, runs per step, Gemma's version, GPT's version); each returns a tensor to backprop through
    pieces = [
        ("norms: 4 RMSNorm | 2 LayerNorm", L,
         lambda: sum(n(x) for n in (gemma_layers[0].input_layernorm, gemma_layers[0].post_attention_layernorm,
                                    gemma_layers[0].pre_feedforward_layernorm, gemma_layers[0].post_feedforward_layernorm)),
         lambda: gpt_block.ln_1(x) + gpt_block.ln_2(x)),
        ("RoPE on q and k | none", L, lambda: apply_rope(q, cos, sin).sum() + apply_rope(k, cos, sin).sum(), None),
        ("attention core, window layer | causal SDPA", (L + 1) // 2,
         lambda: attention(q, k, v, gemma_layers[0].self_attn.scale, cfg.attn_softcap, cfg.sliding_window),
         lambda: F.scaled_dot_product_attention(q_mha, k_mha, v_mha, is_causal=True)),
        ("attention core, global layer | causal SDPA", L // 2,
         lambda: attention(q, k, v, gemma_layers[1].self_attn.scale, cfg.attn_softcap, 0),
         lambda: F.scaled_dot_product_attention(q_mha, k_mha, v_mha, is_causal=True)),
        ("MLP: GeGLU | GELU 4d", L, lambda: gemma_layers[0].mlp(x),
         lambda: gpt_block.fc_out(F.gelu(gpt_block.fc(x)))),
        ("whole window layer | GPT block", (L + 1) // 2, lambda: gemma_layers[0](x, cos, sin), lambda: gpt_block(x)),
        ("whole global layer | GPT block", L // 2, lambda: gemma_layers[1](x, cos, sin), lambda: gpt_block(x)),
        ("LM head + loss: soft-capped | plain", 1,
         lambda: softcapped_cross_entropy(hidden @ embedding.T, targets, cfg.final_softcap)[1],
         lambda: F.cross_entropy(hidden @ embedding.T, targets)),
    ]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for name, _, gemma_fn, gpt_fn in pieces:
            for side, fn in (("gemma", gemma_fn), ("gpt", gpt_fn)):
                if fn is None:
                    continue
                t0 = time.perf_counter()
                fn().sum().backward()
                times.setdefault((name, side), []).append(time.perf_counter() - t0)
    print(f"\n{preset}: forward + backward of each piece, {batch} x {seq} tokens, median of {repeats} (ms)")
    print(f"{'piece (gemma | gpt)':<46} {'gemma':>7} {'gpt':>7} {'x/step':>6} {'gemma - gpt per step':>21}")
    for name, count, _, _ in pieces:
        ms = {side: 1e3 * statistics.median(times[(name, side)]) if (name, side) in times else 0.0
              for side in ("gemma", "gpt")}
        print(f"{name:<46} {ms['gemma']:>7.2f} {ms['gpt']:>7.2f} {count:>6} {count * (ms['gemma'] - ms['gpt']):>+20.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,nano", help="presets to compare, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--breakdown", action="store_true", help="also time each piece of a layer alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    if args.breakdown:
        for preset in args.models.split(","):
            breakdown(preset, repeats=max(args.steps, 5))

    rows = []
    for preset in args.models.split(","):
        cfg = model_config(preset, attn_impl="eager")
        batch = BATCH.get(preset, 4)
        tokens = batch * cfg.context_len
        modes = [False, True] if args.compile else [False]
        for compiled in modes:
            torch.manual_seed(0)
            gemma, gpt = GemmaNano(cfg), baseline_for(preset)
            label = f"{preset}{' compiled' if compiled else ''}"
            print(f"{label}: batch {batch} x {cfg.context_len} tokens per step", flush=True)
            steps = {
                "gemma": make_step(gemma, batch, cfg.context_len, cfg.vocab_size, compiled),
                "gpt": make_step(gpt, batch, cfg.context_len, cfg.vocab_size, compiled),
            }
            try:
                secs = time_pair(steps, args.steps, args.warmup + (1 if compiled else 0))
            except Exception as e:  # torch.compile needs a C++ compiler; say so and go on
                print(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            # the ratio of each pair of neighbouring steps, then the median: a neighbour's load that
            # comes and goes slows both steps of a pair alike, so it cancels in the ratio
            ratio = statistics.median(g / m for g, m in zip(secs["gpt"], secs["gemma"]))
            rows.append((label, gemma.num_params(), gpt.num_params(), tokens / statistics.median(secs["gemma"]),
                         tokens / statistics.median(secs["gpt"]), ratio))

    print()
    print(f"{'model':<15} {'gemma params':>12} {'gpt params':>11} {'gemma tok/s':>12} {'gpt tok/s':>10} {'ratio':>6}")
    for label, p_gemma, p_gpt, tps_gemma, tps_gpt, ratio in rows:
        print(f"{label:<15} {p_gemma / 1e6:>11.2f}M {p_gpt / 1e6:>10.2f}M {tps_gemma:>12,.0f} {tps_gpt:>10,.0f} "
              f"{ratio:>5.2f}x")
    if args.compile:
        eager = {r[0]: r for r in rows if "compiled" not in r[0]}
        for label, _, _, tps_gemma, tps_gpt, _ in rows:
            if "compiled" in label and label.split()[0] in eager:
                base = eager[label.split()[0]]
                print(f"torch.compile speed-up on {label.split()[0]}: gemma {tps_gemma / base[3]:.2f}x, "
                      f"gpt {tps_gpt / base[4]:.2f}x")
    print("tok/s: median step. ratio: median over neighbouring step pairs of GPT time / Gemma time "
          "(> 1 = Gemma faster; goal >= 1.00x). The CPU is shared: expect +-10% between runs.")
    for label, _, _, tps_gemma, tps_gpt, ratio in rows:
        record("bench_model", f"training tok/s, {label}: Gemma-2 Nano vs same-size GPT (SDPA), fwd+bwd+AdamW",
               f"{tps_gemma:,.0f} vs {tps_gpt:,.0f} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
