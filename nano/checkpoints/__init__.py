"""
The model on disk: checkpoints, a ready model for inference, the Hugging Face export.

    checkpoint.py   atomic checkpoints, load_model(), model identity (fingerprints, load_tokenizer)
    loading.py      a ready model for inference: checkpoint + adapter + NF4
    safetensors.py  the safetensors file format: a JSON header and raw tensor bytes
    export.py       a trained model as a Hugging Face folder (Gemma2ForCausalLM + tokenizer.json), and back
"""
