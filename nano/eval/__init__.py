"""
How good is it: held-out loss, and GSM8K / TinyMath grading (lessons 4, 12).

    val_loss.py  validation loss and bits per byte on held-out text
    grading.py   reading the final number out of an answer, right or wrong, accuracy ± stderr
    evaluate.py  GSM8K / TinyMath evaluation: tasks, prompts, batched generation, graded samples
"""
