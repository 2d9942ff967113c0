"""
GPU speed of our fused attention kernel (nano/model/flash_attention.py) against PyTorch's SDPA, flash backend.

The setting of the lesson: causal attention, bf16, head_dim 64, 8 query heads sharing 1 KV head
(multi-query attention), T = 512 ... 4096, with the batch chosen so every row of the table does the
same number of tokens (B * T = 32768). SDPA gets no soft-cap (it cannot apply one: the cap sits
between the scores and the softmax), so the fair comparison is our kernel without a cap; the
"+cap" columns show what Gemma's soft-cap costs us. SDPA reads K/V through `enable_gqa=True`
where this torch supports it with the flash backend, else from K/V repeated to 8 heads.

FLOPs counted (the usual convention): forward 4 * B * Hq * T^2 * D / 2 (two matmuls, half the
scores are masked by causality), backward 2.5 x forward. Times are medians of triton's do_bench.

    .venv/bin/python bench/bench_attention.py            # the table (needs a CUDA GPU)
    .venv/bin/python bench/bench_attention.py --check    # first: max errors vs the reference (fp32/bf16/fp16)
    .venv/bin/python bench/bench_attention.py --sweep    # forward tile sizes tried at T = 2048

Without a CUDA GPU it says so and exits 0 (the CPU interpreter says nothing about speed).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)

SEQ_LENS = (512, 1024, 2048, 4096)
TOKENS_PER_BATCH = 32768  # B * T for every row: B = 64 at T = 512 ... 8 at T = 4096
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 1, 64
SOFTCAP = 50.0  # Gemma-2's attention soft-cap


def causal_forward_flops(batch: int, heads: int, seq_len: int, head_dim: int) -> float:
    """4 * B * H * T^2 * D / 2: QK^T and PV, 2 FLOPs per multiply-add, half the scores masked."""
    return 4 * batch * heads * seq_len**2 * head_dim / 2


def make_inputs(batch, seq_len, dtype, head_dim=HEAD_DIM, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, num_q_heads, seq_len, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, k, v


def sdpa_caller(q, k, v):
    """A function running SDPA's flash backend on (q, k, v), and how it gets the shared K/V head."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    try:  # newer torch: the kernel reads the one KV head for all query heads itself
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            probe = [t[:1, :, :128] for t in (q, k, v)]
            F.scaled_dot_product_attention(*probe, is_causal=True, enable_gqa=True)

        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run, (q, k, v), "enable_gqa"
    except (RuntimeError, TypeError):
        k_rep = k.repeat_interleave(group, dim=1).contiguous()  # (B, Hq, T, D), made once, outside the timing
        v_rep = v.repeat_interleave(group, dim=1).contiguous()

        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run, (q, k_rep, v_rep), "K/V repeated x8"


def time_ms(fn, leaves=None) -> float:
    """Median milliseconds of fn(); with leaves, a forward+backward whose grads are reset each time."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")


def forward_backward(attn, inputs):
    """A closure running attn forward and backward (a random dO, made once), and the leaves to reset."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad_out = torch.randn_like(attn(*leaves))

    def run():
        attn(*leaves).backward(grad_out)

    return run, leaves


def speed_table() -> None:
    from nano.model.flash_attention import flash_attention

    scale = HEAD_DIM**-0.5
    print(f"GPU: {torch.cuda.get_device_name()}   torch {torch.__version__}   bf16, causal, head_dim {HEAD_DIM}, "
          f"{NUM_Q_HEADS} query heads / {NUM_KV_HEADS} KV head, B*T = {TOKENS_PER_BATCH}")
    header = (f"{'T':>5} {'B':>3} | {'fwd ours':>9} {'fwd SDPA':>9} {'ratio':>6} {'ours+cap':>9} | "
              f"{'f+b ours':>9} {'f+b SDPA':>9} {'ratio':>6} {'ours+cap':>9}   (TFLOP/s)")
    print(header)
    print("-" * len(header))
    how_sdpa = ""
    for seq_len in SEQ_LENS:
        batch = TOKENS_PER_BATCH // seq_len
        q, k, v = make_inputs(batch, seq_len, torch.bfloat16)
        sdpa, sdpa_inputs, how_sdpa = sdpa_caller(q, k, v)

        def ours(q, k, v):
            return flash_attention(q, k, v, scale)

        def ours_capped(q, k, v):
            return flash_attention(q, k, v, scale, softcap=SOFTCAP)

        fwd_flops = causal_forward_flops(batch, NUM_Q_HEADS, seq_len, HEAD_DIM)
        tflops = {}
        contenders = (("ours", ours, (q, k, v)), ("sdpa", sdpa, sdpa_inputs), ("cap", ours_capped, (q, k, v)))
        for name, attn, inputs in contenders:
            with torch.no_grad():
                ms = time_ms(lambda attn=attn, inputs=inputs: attn(*inputs))
            tflops[f"fwd {name}"] = fwd_flops / ms * 1e-9
            run, leaves = forward_backward(attn, inputs)
            ms = time_ms(run, leaves)
            tflops[f"f+b {name}"] = 3.5 * fwd_flops / ms * 1e-9  # forward + backward (2.5 x forward)
        print(f"{seq_len:>5} {batch:>3} | {tflops['fwd ours']:>9.1f} {tflops['fwd sdpa']:>9.1f} "
              f"{tflops['fwd ours'] / tflops['fwd sdpa']:>5.2f}x {tflops['fwd cap']:>9.1f} | "
              f"{tflops['f+b ours']:>9.1f} {tflops['f+b sdpa']:>9.1f} "
              f"{tflops['f+b ours'] / tflops['f+b sdpa']:>5.2f}x {tflops['f+b cap']:>9.1f}")
        record("bench_attention", f"fused MQA attention vs SDPA, T={seq_len}, bf16, {torch.cuda.get_device_name()}",
               f"forward {tflops['fwd ours']:.0f} vs {tflops['fwd sdpa']:.0f} TFLOP/s "
               f"({tflops['fwd ours'] / tflops['fwd sdpa']:.2f}x); fwd+bwd {tflops['f+b ours']:.0f} vs "
               f"{tflops['f+b sdpa']:.0f} TFLOP/s ({tflops['f+b ours'] / tflops['f+b sdpa']:.2f}x)")
        del q, k, v, sdpa_inputs
    print(f"SDPA: flash backend, {how_sdpa}, no soft-cap. ratio = ours / SDPA (goal: forward >= 0.8x).")


def check_errors() -> bool:
    """Max |ours - reference| for out, dQ, dK, dV on awkward shapes, in fp32, bf16 and fp16. True if all pass."""
    from nano.model.attention import attention_reference
    from nano.model.flash_attention import flash_attention

    # (B, Hq, Hkv, T, D, softcap, window): tails, windows, G = 1/2/3/8, every supported head_dim
    cases = [
        (2, 8, 1, 1000, 64, SOFTCAP, 256),
        (2, 8, 1, 512, 64, 0.0, 0),
        (1, 4, 2, 777, 128, SOFTCAP, 0),
        (1, 6, 2, 300, 32, 5.0, 100),
        (1, 1, 1, 129, 16, 0.0, 17),
        (1, 8, 8, 200, 256, SOFTCAP, 64),
    ]
    # error limits relative to the largest reference value: fp32 sums in another order; fp16/bf16 round
    # the inputs of every matmul (P and dS included) to 11 / 8 significant bits
    limits = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    all_ok = True
    print(f"GPU: {torch.cuda.get_device_name()}  -- max |ours - reference| / max |reference|")
    for dtype, limit in limits.items():
        for batch, hq, hkv, seq_len, head_dim, softcap, window in cases:
            name = (f"{str(dtype):>14} B={batch} Hq={hq} Hkv={hkv} T={seq_len:>4} D={head_dim:>3} "
                    f"cap={softcap:>4} W={window:>3}")
            q, k, v = make_inputs(batch, seq_len, dtype, head_dim, hq, hkv)
            grad_out = torch.randn_like(q)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            try:
                out = flash_attention(*leaves, head_dim**-0.5, softcap, window)
                out.backward(grad_out)
            except Exception as error:  # e.g. a tile config that does not fit this GPU: report, go on
                print(f"  {name}: FAIL {type(error).__name__}: {str(error)[:200]}")
                all_ok = False
                continue
            leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]  # the reference in fp32
            out32 = attention_reference(*leaves32, head_dim**-0.5, softcap, window)
            out32.backward(grad_out.float())
            errors = []
            for got, want in zip([out] + [t.grad for t in leaves], [out32] + [t.grad for t in leaves32]):
                errors.append(((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
            ok = all(e <= limit for e in errors) and all(torch.isfinite(t.grad).all() for t in leaves)
            all_ok &= ok
            print(f"  {name}: out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} dv {errors[3]:.1e}"
                  f"  {'ok' if ok else f'FAIL (limit {limit:.0e})'}")
    return all_ok


def sweep_forward_tiles(seq_len: int = 2048) -> None:
    """Forward TFLOP/s of a few tile shapes (the table above uses nano.model.flash_attention.gpu_configs)."""
    from nano.model.flash_attention import FlashAttentionFunction, KernelConfigs, TileConfig, gpu_configs

    batch = TOKENS_PER_BATCH // seq_len
    q, k, v = make_inputs(batch, seq_len, torch.bfloat16)
    flops = causal_forward_flops(batch, NUM_Q_HEADS, seq_len, HEAD_DIM)
    default = gpu_configs(HEAD_DIM)
    print(f"forward tile sweep, T={seq_len} B={batch} (default: {default.forward})")
    for rows in (64, 128):
        for keys in (32, 64, 128):
            for num_warps in (4, 8):
                for num_stages in (2, 3, 4):
                    tile = TileConfig(rows, keys, num_warps, num_stages)
                    configs = KernelConfigs(tile, default.backward_kv, default.backward_q)
                    try:
                        with torch.no_grad():
                            ms = time_ms(lambda: FlashAttentionFunction.apply(q, k, v, HEAD_DIM**-0.5, 0.0, 0, configs))
                        print(f"  rows {rows:>3} keys {keys:>3} warps {num_warps} stages {num_stages}: "
                              f"{flops / ms * 1e-9:6.1f} TFLOP/s")
                    except Exception as error:  # e.g. out of shared memory: report and go on
                        print(f"  rows {rows:>3} keys {keys:>3} warps {num_warps} stages {num_stages}: "
                              f"failed ({type(error).__name__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check errors vs the reference before timing")
    parser.add_argument("--sweep", action="store_true", help="also try several forward tile sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: the GPU benchmark needs a CUDA GPU and none was found -- skipped "
              "(the kernel's correctness on the CPU: make check-3)")
        return
    ok = check_errors() if args.check else True
    speed_table()
    if args.sweep:
        sweep_forward_tiles()
    if not ok:
        sys.exit("some errors were above their limits (see FAIL above)")


if __name__ == "__main__":
    main()
