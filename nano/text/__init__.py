"""
Text into token ids: the tokenizer, the chat format, token bins (lessons 1-2).

    pretokenize.py  text -> pre-tokens (regex patterns, special tokens) and their counts over a corpus
    tokenizer.py    byte-level BPE: training, encoding, decoding
    chat_format.py  Gemma chat turns -> token ids + the mask of tokens to train on
    bins.py         token bins on disk and the batches read from them
    padding.py      rows of different lengths as one tensor: right-padded (training), left-padded (generation)
"""
