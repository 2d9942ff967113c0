"""
nano: the whole life of a small Gemma-2-style language model, one concept per module.

    paths.py            where every lesson reads and writes
    fileio.py           files written atomically (no half-written file after a crash), jsonl
    config.py           dataclass defaults + --config files + --field flags
    world.py            the small world of the built-in data: seeded streams, children and pets, places
    story_files.py      the TinyStories file format: write, stream and read story files
    stories.py          the built-in stories: cast, plots, generate_story
    tinymath.py         TinyMath word problems, the "#### N" answer line, arithmetic drills
    synthetic.py        conversations and preference pairs, built from stories and TinyMath
    download.py         opt-in downloads (TinyStories, GSM8K) with resume
    pretokenize.py      text -> pre-tokens (regex patterns, special tokens) and their counts over a corpus
    tokenizer.py        byte-level BPE: training, encoding, decoding
    workers.py          one process pool: map a function over batches, in order, in worker processes
    chat_format.py      Gemma chat turns -> token ids + the mask of tokens to train on
    bins.py             token bins on disk and the batches read from them
    model.py            Gemma-2 Nano (multi-query attention, soft-caps, sandwich norms)
    attention.py        the readable reference attention and the dispatcher
    flash_attention.py  the fused Triton attention kernel (forward + backward)
    checkpoint.py       atomic checkpoints, load_model(), model identity (fingerprints, load_tokenizer)
    trainer.py          the one training loop every lesson shares
    val_loss.py         validation loss and bits per byte on held-out text
    plot.py             hand-written SVG line and bar charts
    sft.py              supervised fine-tuning: what lessons 5, 6 and 7 share
    nf4.py / lora.py    4-bit NormalFloat quantization and low-rank adapters
    loading.py          a ready model for inference: checkpoint + adapter + NF4
    generate.py         sampling with a KV cache
    reward_model.py     a scalar head on the SFT model, trained with the Bradley-Terry loss
    dpo.py              direct preference optimization (sigmoid, cDPO, IPO) and its logged metrics
    flaws.py            programs that find the four flaws of the preference pairs in a model's answers
    rollout.py          sampling responses, their log-probs, KL estimators, rewards: what RL methods share
    online_rl.py        online RL on the shared training loop (prompts, rollout buffers, held-out reward)
    grpo.py / ppo.py    group-relative policy optimization; PPO with a value head and GAE
    evaluate.py         GSM8K / TinyMath grading
    safetensors.py      the safetensors file format: a JSON header and raw tensor bytes
    export.py           a trained model as a Hugging Face folder (Gemma2ForCausalLM + tokenizer.json), and back
    kv_cache.py         the paged KV cache: a block pool, block tables, prefix caching, fork
    paged_attention.py  attention that reads K/V through a block table (gather path, Triton decode kernel)
    inference.py        a one-token decode step in few operations (same numbers as the model's forward)
    model_runner.py     one batched model call over many sequences' paged caches
    engine.py           continuous batching: admit, decode, preempt, cancel, stream
    server.py           an OpenAI-compatible HTTP API and the chat page (Flask)
"""
