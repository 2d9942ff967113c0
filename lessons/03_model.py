"""
Lesson 3: the model. A tour of Gemma-2 Nano -- its shape, where its parameters live, what one KV
head saves, and a check that the fused Triton attention kernel computes what the reference does.

    python lessons/03_model.py                     # or: make lesson-3  (tiny preset)
    python lessons/03_model.py --model nano        # the 20M-parameter Gemma-2 Nano
    python lessons/03_model.py --kernel_check false   # skip the (slow on CPU) Triton check

Needs nothing from earlier lessons and writes nothing: it builds a freshly initialised model and
prints five sections:
  1. the architecture table of the preset,
  2. parameters per component,
  3. KV-cache bytes per token for MQA vs GQA vs MHA, at this size and at Gemma-2-2B's,
  4. the Triton kernel (nano/model/flash_attention.py) against the reference (nano/model/attention.py):
     forward values and gradients, max error -- on the CPU under Triton's interpreter,
  5. one forward pass with a loss.
The doc is lessons/03_model.md; the code is nano/model/gemma.py and nano/model/attention.py.
"""

import math
import os
import time
from dataclasses import dataclass, field

import torch

from nano.common.config import DEFAULT_SEED, parse_config, pick_device, print_config
from nano.model.attention import attention_reference, resolve_attn_impl
from nano.model.gemma import GemmaNano, ModelConfig, kv_cache_bytes_per_token, model_config


@dataclass
class ModelTourConfig:
    model: str = field(default="tiny", metadata={"help": "model preset", "choices": ["tiny", "nano"]})
    n_kv_heads: int = field(default=0, metadata={"help": "KV heads (0 = the preset's: 1, i.e. MQA)"})
    attn_impl: str = field(default="auto", metadata={"help": "attention for the forward pass",
                                                     "choices": ["auto", "eager", "triton"]})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    batch_size: int = field(default=2, metadata={"help": "sequences in the forward pass"})
    kernel_check: bool = field(default=True, metadata={"help": "check the Triton kernel against the reference"})
    check_seq_len: int = field(default=80, metadata={"help": "tokens in the kernel check (80: not a multiple of a tile)"})
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "random seed for the weights and the inputs"})


# Gemma-2-2B's attention shape (its config.json on the Hugging Face Hub, google/gemma-2-2b), for the
# KV-cache arithmetic at full scale
GEMMA2_2B = dict(n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, d_model=2304)


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 88 - len(title)))


def architecture_table(cfg: ModelConfig) -> None:
    section("1. architecture")
    group = cfg.n_heads // cfg.n_kv_heads
    kind = "MQA" if cfg.n_kv_heads == 1 else "MHA" if group == 1 else f"GQA (groups of {group})"
    rows = [
        ("vocab_size", cfg.vocab_size, "tokens; the LM head is the embedding matrix (tied)"),
        ("d_model", cfg.d_model, f"residual width; embeddings scaled by sqrt(d) = {math.sqrt(cfg.d_model):.2f}"),
        ("n_layers", cfg.n_layers, "layers 0, 2, ... use a sliding window; 1, 3, ... attend globally"),
        ("n_heads / n_kv_heads", f"{cfg.n_heads} / {cfg.n_kv_heads}", kind),
        ("head_dim", cfg.head_dim, f"q, k, v per head; n_heads * head_dim = {cfg.n_heads * cfg.head_dim}"),
        ("d_ff", cfg.d_ff, f"GeGLU hidden width ({cfg.d_ff / cfg.d_model:.1f} x d_model), tanh GELU"),
        ("context_len", cfg.context_len, "tokens per training sequence"),
        ("sliding_window", cfg.sliding_window, "keys a query sees on the window layers (itself included)"),
        ("query_pre_attn_scalar", cfg.query_pre_attn_scalar, f"scores scaled by its -1/2 power = {cfg.query_pre_attn_scalar ** -0.5:.4f}"),
        ("attn / final softcap", f"{cfg.attn_softcap:g} / {cfg.final_softcap:g}", "c * tanh(x / c) on scores / on logits"),
        ("rope_theta", f"{cfg.rope_theta:g}", "RoPE base, rotate_half layout, cos/sin in fp32"),
        ("norms", "RMSNorm (1 + w)", f"4 per layer (sandwich) + 1 final, eps {cfg.rms_norm_eps:g}, in fp32"),
    ]
    for name, value, note in rows:
        print(f"  {name:<22} {str(value):<16} {note}")


def parameter_table(model: GemmaNano) -> None:
    section("2. parameters per component")
    cfg = model.cfg
    layer = model.layers[0]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    attn = layer.self_attn
    per_layer = {
        "q_proj": count(attn.q_proj), "k_proj": count(attn.k_proj), "v_proj": count(attn.v_proj),
        "o_proj": count(attn.o_proj), "mlp (gate, up, down)": count(layer.mlp),
        "4 norms": sum(count(getattr(layer, n)) for n in
                       ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")),
    }
    total = model.num_params()
    layer_total = sum(per_layer.values())
    print(f"  {'component':<34} {'shape':<18} {'params':>11} {'share':>7}")
    emb = model.embed_tokens.weight
    print(f"  {'embed_tokens (= LM head, tied)':<34} {str(tuple(emb.shape)):<18} {emb.numel():>11,} {emb.numel() / total:>7.1%}")
    for name, n in per_layer.items():
        shape = {"q_proj": attn.q_proj.weight.shape, "k_proj": attn.k_proj.weight.shape,
                 "v_proj": attn.v_proj.weight.shape, "o_proj": attn.o_proj.weight.shape}.get(name, "")
        shape = str(tuple(shape)) if shape else ""
        print(f"  {'  per layer: ' + name:<34} {shape:<18} {n:>11,} {n * cfg.n_layers / total:>7.1%}  (x{cfg.n_layers} layers)")
    print(f"  {'final norm':<34} {'':<18} {model.norm.weight.numel():>11,}")
    print(f"  {'total':<34} {'':<18} {total:>11,}   = embedding {emb.numel():,} + {cfg.n_layers} x {layer_total:,} + final norm")
    kv_share = (per_layer["k_proj"] + per_layer["v_proj"]) / layer_total
    print(f"  K and V projections are {kv_share:.1%} of a layer; with n_kv_heads = n_heads they would be "
          f"{2 * cfg.d_model * cfg.n_heads * cfg.head_dim:,} per layer instead of {per_layer['k_proj'] + per_layer['v_proj']:,}")


def kv_cache_table(cfg: ModelConfig) -> None:
    section("3. KV-cache bytes per token: MQA vs GQA vs MHA (bf16)")
    print("  bytes per token = 2 (K and V) * layers * kv_heads * head_dim * 2 bytes")
    print(f"  {'model':<26} {'attention':<10} {'kv_heads':>8} {'bytes/token':>12} {'per 8k-token sequence':>22}")
    shapes = [(f"this model ({cfg.n_layers} layers)", cfg), ("Gemma-2-2B (26 layers)", ModelConfig(**GEMMA2_2B))]
    for name, shape in shapes:
        options = {"MQA": 1, "GQA": max(1, shape.n_heads // 2), "MHA": shape.n_heads}
        for kind, kv_heads in options.items():
            c = ModelConfig(n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=kv_heads, head_dim=shape.head_dim)
            per_token = kv_cache_bytes_per_token(c, torch.bfloat16)
            print(f"  {name:<26} {kind:<10} {kv_heads:>8} {per_token:>12,} {per_token * 8192 / 2**20:>19,.1f} MiB")
            name = ""
    print("  (Gemma-2-2B itself uses GQA with 4 KV heads; MQA would cut its cache 4x more.)")


def kernel_check(cfg: ModelConfig, tour: ModelTourConfig, device: str) -> None:
    section("4. the Triton kernel against the reference")
    if device != "cuda":
        # Triton's interpreter runs the kernels with numpy on the CPU; it must be switched on before
        # the module with the @triton.jit functions is imported (the module also does this itself)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from nano.model.flash_attention import flash_attention
    except Exception as e:  # not written yet, or triton missing: say so and go on with the tour
        print(f"  note: cannot import nano.model.flash_attention ({type(e).__name__}: {e}); skipping the kernel check")
        return
    # a small input with this model's head shape: G query heads per KV head, fp32, 80 tokens
    torch.manual_seed(tour.seed)
    heads, kv_heads, head_dim, seq = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, tour.check_seq_len
    where = "GPU" if device == "cuda" else "CPU, TRITON_INTERPRET=1 (slow: numpy, one tile at a time)"
    print(f"  q (1, {heads}, {seq}, {head_dim}), k/v (1, {kv_heads}, {seq}, {head_dim}), fp32, on the {where}")
    print(f"  {'case':<34} {'max |out diff|':>15} {'max |dq diff|':>14} {'max |dk diff|':>14} {'max |dv diff|':>14} {'time':>7}")
    scale = cfg.query_pre_attn_scalar**-0.5
    worst = 0.0
    for name, softcap, window in [("causal, no soft-cap", 0.0, 0), (f"soft-cap {cfg.attn_softcap:g}", cfg.attn_softcap, 0),
                                  (f"soft-cap {cfg.attn_softcap:g}, window {cfg.sliding_window}", cfg.attn_softcap, cfg.sliding_window)]:
        q = torch.randn(1, heads, seq, head_dim, device=device, requires_grad=True)
        k = torch.randn(1, kv_heads, seq, head_dim, device=device, requires_grad=True)
        v = torch.randn(1, kv_heads, seq, head_dim, device=device, requires_grad=True)
        grad_out = torch.randn(1, heads, seq, head_dim, device=device)
        ref = attention_reference(q, k, v, scale, softcap, window)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        start = time.time()
        try:
            out = flash_attention(q, k, v, scale, softcap, window)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        except Exception as e:
            print(f"  {name:<34} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        errors = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)]
        worst = max(worst, *errors)
        print(f"  {name:<34} " + " ".join(f"{e:>14.2e}" for e in errors) + f" {time.time() - start:>6.1f}s")
    print(f"  worst difference {worst:.1e}: {'the same computation, up to fp32 rounding' if worst < 1e-3 else 'TOO LARGE -- a bug'}")


def forward_pass(model: GemmaNano, tour: ModelTourConfig, device: str) -> None:
    section("5. one forward pass")
    cfg = model.cfg
    gen = torch.Generator().manual_seed(tour.seed)
    idx = torch.randint(0, cfg.vocab_size, (tour.batch_size, cfg.context_len + 1), generator=gen).to(device)
    inputs, targets = idx[:, :-1], idx[:, 1:]  # predict each next token
    with torch.no_grad():
        model(inputs[:, :8])  # warm-up: the first call pays one-time set-up costs (thread pool, kernels)
        start = time.time()
        logits, loss = model(inputs, targets)
        elapsed = time.time() - start
    impl = resolve_attn_impl(cfg.attn_impl, device)
    print(f"  input ids {tuple(inputs.shape)} -> logits {tuple(logits.shape)} {logits.dtype}, attention '{impl}', {elapsed * 1000:.0f} ms")
    print(f"  logits in [{logits.min().item():.2f}, {logits.max().item():.2f}] (the final soft-cap keeps them inside +-{cfg.final_softcap:g})")
    print(f"  loss {loss.item():.4f} vs ln(vocab) = {math.log(cfg.vocab_size):.4f}: an untrained model guesses "
          f"almost uniformly (perplexity {math.exp(loss.item()):,.0f} of {cfg.vocab_size:,})")


def main(argv: list[str] | None = None) -> None:
    tour = parse_config(ModelTourConfig, argv)
    print_config(tour)
    device = pick_device(tour.device)
    overrides = {"attn_impl": tour.attn_impl}
    if tour.n_kv_heads:
        overrides["n_kv_heads"] = tour.n_kv_heads
    cfg = model_config(tour.model, **overrides)
    torch.manual_seed(tour.seed)
    model = GemmaNano(cfg).to(device).eval()
    print(f"\nGemma-2 Nano, preset '{tour.model}': {model.num_params():,} parameters on {device}; writes nothing")

    architecture_table(cfg)
    parameter_table(model)
    kv_cache_table(cfg)
    if tour.kernel_check:
        kernel_check(cfg, tour, device)
    forward_pass(model, tour, device)


if __name__ == "__main__":
    main()
