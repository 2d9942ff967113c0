"""
The small world the built-in data is set in: seeded random streams, the children and pets who live
there, and the places they go.

Both the stories (nano/data/stories.py) and the TinyMath word problems (nano/data/tinymath.py) are told about
these characters: "Lily lost her kite in the park", "Lily has 3 apples...". Keeping the cast here,
below both, means neither generator needs the other (and nano/data/synthetic.py, which mixes stories and
math into conversations and preference pairs, sits above them all).

Everything random comes from `rng_for(seed, stream)`: one `random.Random` per split, so the same
seed gives the same bytes and one split never shifts another.

    >>> rng = rng_for(0, "demo")
    >>> kid = character(rng, child_only=True)
    >>> kid.kind in ("girl", "boy") and kid.his in ("her", "his")
    True
    >>> article("apple"), article("ball")
    ('an', 'a')
"""

from __future__ import annotations

import random


def rng_for(seed: int, stream: str) -> random.Random:
    """An independent random stream for one split ("stories_val", "tinymath_test", ...).

    A string seed is hashed with SHA-512 by `random.seed`, so it is the same on every machine and
    every run (unlike `hash()`, which Python salts per process).
    """
    return random.Random(f"nano/{seed}/{stream}")


def pick(rng: random.Random, options):
    """rng.choice, about twice as fast (it is called ~15 times a story; 100 MB is ~150k stories).

    subtle: it draws one rng.random(), where rng.choice draws differently; swapping one for the other
    would change every file lesson 0 writes.
    """
    return options[int(rng.random() * len(options))]


def article(word: str) -> str:
    """'a' or 'an' before a word: article('apple') -> 'an', article('ball') -> 'a'."""
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# who lives here, and where they go
# ---------------------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily Mia Sue Anna Emma Lucy Zoe Amy Ella Rose Kate Jane Mary Sara Lisa Nina Ruby Daisy Molly Ava "
    "Chloe Grace Ivy Hannah Sophie Maya Julia Lola Tina Pam Bella Clara Eva Fay Hazel Iris Jenny Kim Lena Nora"
).split()
BOY_NAMES = (
    "Tom Max Ben Sam Tim Leo Jack Joe Jake Finn Bob Dan Ned Noah Luke Owen Ryan Alex Eli Hugo "
    "Kevin Mark Paul Pete Theo Toby Zack Adam Billy Carl Dave Evan Fred Gus Henry Ian Jim Kyle Milo Oscar"
).split()
PET_NAMES = (
    "Spot Buddy Fluffy Coco Pip Sunny Whiskers Rocky Bingo Patch Muffin Peanut Ziggy Snowy Ginger "
    "Pepper Biscuit Button Dot Bubbles Tiny Shadow Lucky Honey Mittens"
).split()
ANIMAL_HEROES = "dog cat bunny bear duck fox frog mouse owl pig bird squirrel turtle lamb puppy kitten".split()
PLACES = "park garden forest beach lake farm playground zoo meadow hill backyard pond".split()


class Character:
    """A name, what it is ('girl', 'dog', ...) and its pronouns, so templates read `h.He` / `h.his`."""

    __slots__ = ("name", "kind", "he", "him", "his", "He", "His")

    def __init__(self, name: str, kind: str, he: str):
        self.name, self.kind, self.he = name, kind, he
        self.him, self.his = ("her", "her") if he == "she" else ("him", "his")
        self.He, self.His = self.he.capitalize(), self.his.capitalize()

    @property
    def described(self) -> str:
        """'a girl named Lily' -- how a prompt asks for this character."""
        return f"{article(self.kind)} {self.kind} named {self.name}"


def character(rng: random.Random, avoid: str = "", child_only: bool = False) -> Character:
    """A girl (36%), a boy (36%) or a named animal (28%), never called `avoid`.

    child_only (word problems: "Lily has 3 apples", not "Spot has 3 apples") scales the roll into
    [0, 0.72), so it always lands on a girl or a boy.
    """
    while True:
        roll = rng.random() * (0.72 if child_only else 1.0)
        if roll < 0.36:
            c = Character(pick(rng, GIRL_NAMES), "girl", "she")
        elif roll < 0.72:
            c = Character(pick(rng, BOY_NAMES), "boy", "he")
        else:
            c = Character(pick(rng, PET_NAMES), pick(rng, ANIMAL_HEROES), pick(rng, ("he", "she")))
        if c.name != avoid:
            return c
