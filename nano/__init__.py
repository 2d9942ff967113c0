"""
nano: the whole life of a small Gemma-2-style language model, one concept per module.

The modules live in wings, one per arc of the model's life. The wings are listed bottom-up: a
module imports only from its own wing and the wings above it in this list, never from one below
(tests/test_00_layout.py checks it), so each wing can be read knowing only the ones before it.
Each wing's __init__.py lists its modules; the README's lesson table maps lessons to them.

    common/       The ground floor: what every other wing uses and that knows nothing of language models.
    data/         The raw text: the built-in world and its stories, TinyMath, and opt-in downloads (lesson 0).
    text/         Text into token ids: the tokenizer, the chat format, token bins (lessons 1-2).
    model/        The network and what runs it: Gemma-2 Nano, attention, NF4, LoRA, generation (lessons 3, 6, 7, 13).
    checkpoints/  The model on disk: checkpoints, a ready model for inference, the Hugging Face export.
    eval/         How good is it: held-out loss, and GSM8K / TinyMath grading (lessons 4, 12).
    train/        The training loop every lesson shares, and supervised fine-tuning (lessons 4-7).
    align/        Alignment: the reward model, DPO, GRPO and PPO (lessons 8-11).
    serve/        Serving many users at once: a paged KV cache, continuous batching, an HTTP API (lesson 14).
"""
