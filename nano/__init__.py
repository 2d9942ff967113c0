"""
nano: the whole life of a small Gemma-2-style language model, one concept per module.

    paths.py            where every lesson reads and writes
    config.py           dataclass defaults + --config files + --field flags
    synthetic.py        the built-in offline corpus (stories, conversations, TinyMath, preferences)
    download.py         opt-in downloads (TinyStories, GSM8K) with resume
    tokenizer.py        byte-level BPE: training, encoding, decoding
    chat_format.py      Gemma chat turns -> token ids + the mask of tokens to train on
    bins.py             token bins on disk and the batches read from them
    model.py            Gemma-2 Nano (multi-query attention, soft-caps, sandwich norms)
    attention.py        the readable reference attention and the dispatcher
    flash_attention.py  the fused Triton attention kernel (forward + backward)
    checkpoint.py       atomic checkpoints, load_model()
    trainer.py          the one training loop every lesson shares
    plot.py             hand-written SVG line and bar charts
    sft.py              supervised fine-tuning: what lessons 5, 6 and 7 share
    nf4.py / lora.py    4-bit NormalFloat quantization and low-rank adapters
    loading.py          a ready model for inference: checkpoint + adapter + NF4
    generate.py         sampling with a KV cache
    evaluate.py         GSM8K / TinyMath grading
"""
