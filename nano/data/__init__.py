"""
The raw text: the built-in world and its stories, TinyMath, and opt-in downloads (lesson 0).

    world.py        the small world of the built-in data: seeded streams, children and pets, places
    story_files.py  the TinyStories file format: write, stream and read story files
    stories.py      the built-in stories: cast, plots, generate_story
    tinymath.py     TinyMath word problems, the "#### N" answer line, arithmetic drills
    synthetic.py    conversations and preference pairs, built from stories and TinyMath
    download.py     opt-in downloads (TinyStories, GSM8K) with resume
"""
