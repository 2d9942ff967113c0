"""
nano: the whole life of a small Gemma-2-style language model, one concept per module.

The modules live in wings, one per arc of the model's life. The wings are listed bottom-up: a
module imports only from its own wing and the wings above it in this list, never from one below
(tests/test_00_layout.py checks it), so each wing can be read knowing only the ones before it.

common/  The ground floor: what every other wing uses and that knows nothing of language models.
    paths.py    where every lesson reads and writes, and the layout of a run's folder
    fileio.py   files written atomically (no half-written file after a crash), jsonl
    config.py   dataclass defaults + --config files + --field flags
    workers.py  one process pool: map a function over batches, in order, in worker processes
    plot.py     hand-written SVG line and bar charts

data/  The raw text: the built-in world and its stories, TinyMath, and opt-in downloads (lesson 0).
    world.py        the small world of the built-in data: seeded streams, children and pets, places
    story_files.py  the TinyStories file format: write, stream and read story files
    stories.py      the built-in stories: cast, plots, generate_story
    tinymath.py     TinyMath word problems, the "#### N" answer line, arithmetic drills
    synthetic.py    conversations and preference pairs, built from stories and TinyMath
    download.py     opt-in downloads (TinyStories, GSM8K) with resume

text/  Text into token ids: the tokenizer, the chat format, token bins (lessons 1-2).
    pretokenize.py  text -> pre-tokens (regex patterns, special tokens) and their counts over a corpus
    tokenizer.py    byte-level BPE: training, encoding, decoding
    chat_format.py  Gemma chat turns -> token ids + the mask of tokens to train on
    bins.py         token bins on disk and the batches read from them
    padding.py      rows of different lengths as one tensor: right-padded (training), left-padded (generation)

model/  The network and what runs it: Gemma-2 Nano, attention, NF4, LoRA, generation (lessons 3, 6, 7, 13).
    gemma.py            Gemma-2 Nano (multi-query attention, soft-caps, sandwich norms)
    attention.py        the readable reference attention and the dispatcher
    flash_attention.py  the fused Triton attention kernel (forward + backward)
    decode_step.py      the fused one-token decode step: the forward's numbers in few operations
    lora.py             low-rank adapters
    nf4.py              4-bit NormalFloat quantization
    generate.py         sampling with a KV cache, and the one rule that says when a reply stops

checkpoints/  The model on disk: checkpoints, a ready model for inference, the Hugging Face export.
    checkpoint.py   atomic checkpoints, load_model(), model identity (fingerprints, load_tokenizer)
    loading.py      a ready model for inference: checkpoint + adapter + NF4
    safetensors.py  the safetensors file format: a JSON header and raw tensor bytes
    export.py       a trained model as a Hugging Face folder (Gemma2ForCausalLM + tokenizer.json), and back

eval/  How good is it: held-out loss, and GSM8K / TinyMath grading (lessons 4, 12).
    val_loss.py  validation loss and bits per byte on held-out text
    grading.py   reading the final number out of an answer, right or wrong, accuracy ± stderr
    evaluate.py  GSM8K / TinyMath evaluation: tasks, prompts, batched generation, graded samples

train/  The training loop every lesson shares, and supervised fine-tuning (lessons 4-7).
    trainer.py  the one training loop every lesson shares
    sft.py      supervised fine-tuning: what lessons 5, 6 and 7 share

align/  Alignment: the reward model, DPO, GRPO and PPO (lessons 8-11).
    reward_model.py  a scalar head on the SFT model, trained with the Bradley-Terry loss
    dpo.py           direct preference optimization (sigmoid, cDPO, IPO) and its logged metrics
    flaws.py         programs that find the four flaws of the preference pairs in a model's answers
    policy.py        where a run starts: the policy to train (full, LoRA, QLoRA) and its frozen reference
    logprobs.py      log-probs of response tokens, masked means, KL estimators, the clipped surrogate
    rollout.py       batches of sampled responses and their rewards
    online_rl.py     online RL on the shared training loop (prompts, rollout buffers, held-out reward)
    grpo.py          group-relative policy optimization
    ppo.py           PPO with a value head and GAE

serve/  Serving many users at once: a paged KV cache, continuous batching, an HTTP API (lesson 14).
    kv_cache.py         the paged KV cache: a block pool, block tables, prefix caching, fork
    paged_attention.py  attention that reads K/V through a block table (gather path, Triton decode kernel)
    sequence.py         what a request asks for (SamplingParams) and the sequences that carry it
    scheduler.py        the waiting and running queues: admit, reserve decode slots, preempt, fork
    model_runner.py     one batched model call over many sequences' paged caches
    engine.py           continuous batching: the loop (schedule, run the model, sample, stream, cancel)
    server.py           an OpenAI-compatible HTTP API and the chat page (Flask; static/chat.html)
"""
