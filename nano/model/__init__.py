"""
The network and what runs it: Gemma-2 Nano, attention, NF4, LoRA, generation (lessons 3, 6, 7, 13).

    gemma.py            Gemma-2 Nano (multi-query attention, soft-caps, sandwich norms)
    attention.py        the readable reference attention and the dispatcher
    flash_attention.py  the fused Triton attention kernel (forward + backward)
    decode_step.py      the fused one-token decode step: the forward's numbers in few operations
    lora.py             low-rank adapters
    nf4.py              4-bit NormalFloat quantization
    generate.py         sampling with a KV cache, and the one rule that says when a reply stops
"""
