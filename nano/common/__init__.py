"""
The ground floor: what every other wing uses and that knows nothing of language models.

    paths.py    where every lesson reads and writes, and the layout of a run's folder
    fileio.py   files written atomically (no half-written file after a crash), jsonl
    config.py   dataclass defaults + --config files + --field flags
    workers.py  one process pool: map a function over batches, in order, in worker processes
    plot.py     hand-written SVG line and bar charts
"""
