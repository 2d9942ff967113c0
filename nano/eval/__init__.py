"""
How good is it: held-out loss, GSM8K / TinyMath grading, the words skill (lessons 4, 10, 12).

    val_loss.py  validation loss and bits per byte on held-out text
    grading.py   reading the final number out of an answer, right or wrong, accuracy ± stderr
    evaluate.py  GSM8K / TinyMath evaluation: tasks, prompts, batched generation, graded samples
    words_skill.py  "write a story using the words ...": the check, the held-out requests, their evaluation
"""
