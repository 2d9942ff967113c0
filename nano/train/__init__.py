"""
The training loop every lesson shares, and supervised fine-tuning (lessons 4-7).

    trainer.py  the one training loop every lesson shares
    sft.py      supervised fine-tuning: what lessons 5, 6 and 7 share
"""
