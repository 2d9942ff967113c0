"""
The story world: a seeded generator of short children's stories, in the shape of TinyStories.

Stories are assembled from a cast (a hero, a friend, a grown-up, a place, a toy, a food), one of a
dozen small plots ("loses a toy", "learns to share", "is afraid of the dark", ...), and optional
dialogue and a moral -- the shape of TinyStories (Eldan & Li, 2023), with simple words only. Each
`Story` also knows what is in it (questions it answers, words it uses), which is what
nano/data/synthetic.py builds instruction conversations and preference pairs from.

The characters and the seeded streams come from nano/data/world.py; the file format from
nano/data/story_files.py. The same seed gives the same stories, and asking for more train stories never
changes the validation stories (each split has its own stream, see `rng_for`).

    >>> story = generate_story(rng_for(0, "demo"))
    >>> story.text[:72]
    'Once upon a time, in a small town, there lived a clever girl named Lena.'
    >>> story.plot, story.feature, story.qa[0], story.keywords
    ('lost_toy', 'who loses her hat', ('What did Lena lose?', 'Lena lost her hat.'), ['hat', 'park', 'rock', 'red'])

Run `python lessons/00_data.py` to write stories_{train,val}.txt; tests: tests/test_00_data.py.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from nano.data.story_files import write_story_file
from nano.data.world import PLACES, Character, article, character, pick, rng_for

# ---------------------------------------------------------------------------------------------
# 1. words the stories are made of (the names and places are in nano/data/world.py)
# ---------------------------------------------------------------------------------------------

HERO_ADJECTIVES = "little happy kind curious brave shy small silly friendly playful gentle clever cheerful busy".split()
ACTIVITIES = (
    "play outside", "draw pictures", "sing songs", "dance in the sun", "read books", "jump in puddles",
    "build tall towers with blocks", "look at the stars", "run in the grass", "climb trees",
    "pick flowers", "splash in the water", "chase butterflies", "play hide and seek", "make mud pies",
    "count the clouds", "listen to stories", "paint with bright colors", "play with friends",
)
TOYS = "ball kite doll truck boat drum robot hat book train car whistle bucket crayon".split()
COLORS = "red blue green yellow pink purple orange shiny little soft".split()
FOODS = "apple cookie sandwich banana muffin pear cupcake orange peach carrot".split()
# (word, pronoun) -- the grown-up in a story
ADULTS = (("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he"))
TIMES = ("sunny morning", "warm afternoon", "bright day", "cool evening", "windy day", "quiet morning")
SEARCH_SPOTS = (
    "behind the tree", "under the bench", "near the pond", "in the sandbox", "by the flowers",
    "under the slide", "next to the fence", "behind the swings",
)
# (where the lost thing was, the noun a "use these words" prompt may ask for)
FOUND_SPOTS = (
    ("under a big bush", "bush"), ("in the tall grass", "grass"), ("behind a big rock", "rock"),
    ("under a pile of leaves", "leaves"), ("inside a hollow log", "log"), ("next to a sleeping cat", "cat"),
)
SCENERY = (
    "The sun was shining and the sky was blue.", "Birds were singing in the trees.",
    "A soft wind moved the leaves.", "The air smelled like fresh flowers.",
    "Big white clouds floated across the sky.", "A little bee buzzed past.",
    "The grass was soft and green.", "Somewhere a dog was barking.", "Everything was calm and quiet.",
)
GAMES = ("tag", "hide and seek", "catch", "hopscotch", "jump rope")


# where things happen: "in the park" but "at the beach" and "on the farm"
PLACE_AT = {
    "park": "in the park", "garden": "in the garden", "forest": "in the forest", "beach": "at the beach",
    "lake": "by the lake", "farm": "on the farm", "playground": "at the playground", "zoo": "at the zoo",
    "meadow": "in the meadow", "hill": "on the hill", "backyard": "in the backyard", "pond": "by the pond",
}


@dataclass
class Cast:
    """Everything a plot may mention, sampled once per story (plots use what they need)."""

    hero: Character
    friend: Character
    adult: str
    adult_he: str
    place: str
    at: str  # "in the park"
    toy: str
    color: str
    food: str
    time: str
    talk: bool  # tell this story with dialogue?


def _cast(rng: random.Random) -> Cast:
    hero = character(rng)
    adult, adult_he = pick(rng, ADULTS)
    place = pick(rng, PLACES)
    return Cast(
        hero=hero, friend=character(rng, avoid=hero.name), adult=adult, adult_he=adult_he,
        place=place, at=PLACE_AT[place], toy=pick(rng, TOYS), color=pick(rng, COLORS), food=pick(rng, FOODS),
        time=pick(rng, TIMES), talk=rng.random() < 0.6,
    )


@dataclass
class Plot:
    """What one plot template produced: its sentences and the facts a question can ask about."""

    middle: list[str]  # the events
    ending: list[str]  # how it turns out
    feature: str  # "who loses her ball" -- what a prompt can ask for
    qa: list[tuple[str, str]]  # questions the story answers, with their answers
    keywords: list[str]  # content words the story uses (candidates for "use the words ...")
    morals: tuple[str, ...]  # lessons the story may end with


@dataclass
class Story:
    """One generated story and what we know about it (used by the conversation and preference builders)."""

    text: str
    hero: Character
    plot: str
    feature: str
    qa: list[tuple[str, str]]
    candidate_words: list[str]
    has_dialogue: bool
    has_moral: bool

    @property
    def keywords(self) -> list[str]:
        """Content words the story really uses (computed on demand: the regex is the slow part of a story)."""
        return [w for w in dict.fromkeys(self.candidate_words) if w.isalpha() and uses_word(self.text, w)]


# ---------------------------------------------------------------------------------------------
# 2. the plots: each takes (rng, cast) and returns a Plot; `c.talk` picks dialogue or narration
# ---------------------------------------------------------------------------------------------


def _plot_lost_toy(rng: random.Random, c: Cast) -> Plot:
    h, f, toy = c.hero, c.friend, c.toy
    spot, spot_word = pick(rng, FOUND_SPOTS)
    look1, look2 = rng.sample(SEARCH_SPOTS, 2)
    m = [
        pick(rng, (f"One day, {h.name} went to the {c.place} with {h.his} {c.color} {toy}.",
                    f"One {c.time}, {h.name} took {h.his} {c.color} {toy} to the {c.place}.")),
        pick(rng, (f"{h.He} played with it for a long time.", f"{h.He} played and played until the sun was low.")),
        pick(rng, (f"When it was time to go home, {h.name} could not find {h.his} {toy}.",
                    f"Then {h.he} looked away for a moment, and the {toy} was gone!")),
        f'"Oh no! Where is my {toy}?" {h.name} cried.' if c.talk else f"{h.name} felt very {pick(rng, ('sad', 'worried', 'upset'))}.",
        f"{h.His} friend {f.name} saw that {h.name} was sad.",
        f'"Don\'t worry, I will help you look," said {f.name}.' if c.talk else f"{f.name} said {f.he} would help {h.him} look.",
        f"They looked {look1}. They looked {look2}. But the {toy} was not there.",
        f"At last, {f.name} found the {toy} {spot}!",
    ]
    e = [f"{h.name} was so happy. {h.He} gave {f.name} a big hug."]
    if c.talk:
        e.append(f'"Thank you, {f.name}!" said {h.name}.')
    return Plot(m, e, f"who loses {h.his} {toy}",
                [(f"What did {h.name} lose?", f"{h.name} lost {h.his} {toy}."),
                 (f"Who found the {toy}?", f"{f.name} found the {toy}."),
                 (f"Where was the {toy}?", f"The {toy} was {spot}."),
                 (f"Where did {h.name} take the {toy}?", f"{h.name} took the {toy} to the {c.place}.")],
                [toy, c.place, spot_word, c.color],
                (f"{h.name} learned to take good care of {h.his} things.", "Good friends always help each other."))


def _plot_share(rng: random.Random, c: Cast) -> Plot:
    h, f, food = c.hero, c.friend, c.food
    seat = pick(rng, ("bench", "rock", "log", "blanket"))
    m = [
        pick(rng, (f"One day, {h.name} had a big {food} for {h.his} snack.",
                    f"One {c.time}, {h.name}'s {c.adult} gave {h.him} a big {food}.")),
        f"{h.He} sat down on a {seat} {c.at} to eat it.",
        f"Then {h.name} saw {f.name}. {f.name} looked sad because {f.he} had no snack.",
        pick(rng, (f"At first, {h.name} did not want to share.", f"{h.name} held the {food} close.")),
        f'"But this is my {food}," {h.name} thought.' if c.talk else f"{h.He} wanted to eat it all by {h.him}self.",
        pick(rng, (f"But then {h.he} saw how sad {f.name} was.", f"Then {h.he} remembered how it feels to be hungry.")),
        f"{h.name} broke the {food} in two and gave half to {f.name}.",
    ]
    if c.talk:
        m.append(f'"Here, you can have some," said {h.name}. "Thank you!" said {f.name} with a big smile.')
    e = [pick(rng, (f"The {food} tasted even better when they ate it together.",
                     f"They sat on the {seat} and ate together and laughed."))]
    return Plot(m, e, f"who learns to share {h.his} {food}",
                [(f"What did {h.name} share with {f.name}?", f"{h.name} shared {h.his} {food} with {f.name}."),
                 (f"Why was {f.name} sad?", f"{f.name} was sad because {f.he} had no snack."),
                 (f"Where did {h.name} sit down?", f"{h.name} sat down on a {seat} {c.at}.")],
                [food, seat, c.place],
                ("Sharing makes everyone happy.", f"{h.name} learned that sharing is caring."))


# (what the hero fears, the scene, what the grown-up says, what the hero does, how it felt)
_FEARS = (
    ("the dark", "Every night, when the lights went off, {n} hid under {his} blanket.",
     "The dark is just the night saying good night", "{n} looked around the dark room and saw the moon shining through the window.",
     "The moon was like a little night light."),
    ("the big slide", "At the playground, all the other kids went down the big slide, but {n} only watched.",
     "You can do it. I will wait for you at the bottom", "{n} climbed up the ladder and went down the slide. Whoosh!",
     "{He} went down again and again."),
    ("the water", "At the lake, {n} did not want to put even one toe in the water.",
     "Hold my hand and we will go in together, one small step at a time", "{n} held on tight and walked into the water, one small step at a time.",
     "Soon {he} was kicking and splashing and laughing."),
    ("thunder", "One night there was a big storm, and every boom of thunder made {n} jump.",
     "Thunder is only the sound of clouds bumping into each other", "{n} counted the seconds between the flash and the boom, and the storm did not seem so big.",
     "Soon {he} was fast asleep."),
    ("the big dog next door", "Every time {n} walked past the house next door, the big dog barked loudly.",
     "That dog only barks because he wants to say hello", "{n} held out {his} hand, and the big dog sniffed it and wagged his tail.",
     "The dog licked {his} hand and they became friends."),
)


def _plot_fear(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    what, scene, says, does, after = pick(rng, _FEARS)
    fill = {"n": h.name, "his": h.his, "he": h.he, "He": h.He}
    m = [f"{h.name} was afraid of {what}.", scene.format(**fill)]
    if c.talk:
        m.append(f'"{says}," said {h.his} {c.adult}.')
    else:
        m.append(f"{h.His} {c.adult} told {h.him} not to be scared.")
    m += [f"{h.name} took a deep breath.", does.format(**fill), "It was not so scary after all!"]
    e = [after.format(**fill), f"{h.name} felt very proud of {h.him}self."]
    return Plot(m, e, f"who is afraid of {what}",
                [(f"What was {h.name} afraid of?", f"{h.name} was afraid of {what}."),
                 (f"Who helped {h.name} be brave?", f"{h.name}'s {c.adult} helped {h.him} be brave.")],
                [what.split()[-1], c.adult, "breath"],
                ("Being brave means trying even when you are scared.", f"{h.name} learned that {h.he} could be brave."))


# (animal, its trouble, how it was helped)
_TROUBLES = (
    ("bird", "with a hurt wing", "They put the bird in a soft box and gave it water. After a few days, the bird could fly again."),
    ("kitten", "stuck up in a tree", "{adult} got a ladder and carried the kitten down, safe and sound."),
    ("duckling", "that had lost its mother", "They walked along the pond until they found the mother duck, and the duckling swam to her."),
    ("puppy", "that was lost and shivering", "They wrapped the puppy in a warm towel and found its owner, who was very thankful."),
    ("turtle", "that was stuck on its back", "Very gently, they turned the turtle over, and it walked slowly away."),
)


def _plot_help_animal(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    animal, trouble, helped = pick(rng, _TROUBLES)
    adult = f"{h.His} {c.adult}"
    m = [
        f"One {c.time}, {h.name} was walking {c.at}.",
        pick(rng, (f"Suddenly, {h.he} heard a small sound.", f"Then {h.he} saw something move.")),
        f"It was a little {animal} {trouble}.",
        f'"Poor little {animal}! I will help you," said {h.name}.' if c.talk else f"{h.name} wanted to help the {animal}.",
        f"{h.He} ran to get {h.his} {c.adult}.",
        helped.format(adult=adult),
    ]
    e = [pick(rng, (f"{h.name} smiled. Helping the {animal} made {h.him} feel warm inside.",
                     f"{h.name} waved goodbye to the {animal}. It was the best day ever."))]
    return Plot(m, e, f"who helps a little {animal} {trouble}",
                [(f"What animal did {h.name} help?", f"{h.name} helped a little {animal}."),
                 (f"Where was {h.name} walking?", f"{h.name} was walking {c.at}."),
                 (f"Who did {h.name} run to get?", f"{h.name} ran to get {h.his} {c.adult}.")],
                [animal, c.place, c.adult],
                ("It is good to help those who need it.", "Being kind to animals is important."))


def _plot_broken(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    thing = pick(rng, ("vase", "lamp", "cup", "plate", "bowl"))
    m = [
        f"{h.name}'s {c.adult} told {h.him} not to play ball in the house.",
        f"But one rainy day, {h.name} was bored, so {h.he} threw {h.his} ball against the wall.",
        f"The ball bounced and hit the {thing}. Crash! The {thing} broke into pieces.",
        f"{h.name} was scared. {h.He} thought about hiding the pieces.",
        f'When {h.his} {c.adult} came in, {h.name} said, "I am sorry. I broke the {thing}."' if c.talk
        else f"But when {h.his} {c.adult} came in, {h.name} told the truth about the {thing}.",
        f"{h.His} {c.adult} was sad about the {thing}, but {c.adult_he} was glad that {h.name} told the truth.",
    ]
    e = [f"They cleaned up the pieces together, and {h.name} played ball outside after that."]
    return Plot(m, e, f"who breaks a {thing} and tells the truth",
                [(f"What did {h.name} break?", f"{h.name} broke the {thing}."),
                 (f"Did {h.name} tell the truth?", f"Yes, {h.name} told {h.his} {c.adult} the truth.")],
                [thing, "ball", "truth", c.adult],
                ("It is always best to tell the truth.", f"{h.name} learned that telling the truth is the right thing to do."))


def _plot_new_friend(rng: random.Random, c: Cast) -> Plot:
    h, f = c.hero, c.friend
    game = pick(rng, GAMES)
    m = [
        f"One day, {h.name} went to the {c.place}, but none of {h.his} friends were there.",
        f"Then {h.he} saw {article(f.kind)} {f.kind} sitting alone.",
    ]
    if c.talk:
        m += [f'"Hello! My name is {h.name}. Do you want to play?" {h.he} asked.',
              f'"Yes! My name is {f.name}," said the {f.kind} with a smile.']
    else:
        m += [f"{h.name} said hello and asked if {f.he} wanted to play.", f"The {f.kind} smiled. {f.His} name was {f.name}."]
    m += [f"{h.name} and {f.name} played {game}.", pick(rng, SCENERY)]
    e = [f"They played until the sun went down.", f"From that day on, {h.name} and {f.name} were best friends."]
    return Plot(m, e, f"who makes a new friend at the {c.place}",
                [(f"Who did {h.name} meet at the {c.place}?", f"{h.name} met {f.name}."),
                 (f"What game did {h.name} and {f.name} play?", f"They played {game}.")],
                [c.place, "friends", "alone", game.split()[-1]],
                ("Saying hello is the first step to a new friendship.", "A new friend can be waiting anywhere."))


def _plot_bake(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    treat = pick(rng, ("cake", "cookies", "pie", "bread", "muffins"))
    who = pick(rng, ("grandma", "grandpa", "their neighbor", "the teacher")) if c.adult not in ("grandma", "grandpa") else "their neighbor"
    it = "them" if treat.endswith("s") else "it"
    m = [
        f"One {c.time}, {h.name} and {h.his} {c.adult} wanted to bake {treat} for {who}.",
        "They put flour, eggs and sugar in a big bowl.",
        f"{h.name} mixed and mixed. Then {h.he} spilled flour all over the floor!",
        f'"Oops!" said {h.name}, and they both laughed.' if c.talk else f"{h.name} and {h.his} {c.adult} both laughed.",
        f"They put the {treat} in the oven. Soon the whole house smelled sweet.",
        f"When the {treat} {'were' if it == 'them' else 'was'} ready, they took {it} to {who}.",
    ]
    e = [f"{who.capitalize()} was so happy and said thank you."]
    if c.talk:
        e.append(f'"This is the best {treat.rstrip("s")} I have ever had!" {who} said.')
    return Plot(m, e, f"who bakes {treat} with {h.his} {c.adult}",
                [(f"What did {h.name} and {h.his} {c.adult} bake?", f"They baked {treat}."),
                 (f"Who were the {treat} for?" if it == "them" else f"Who was the {treat} for?", f"The {treat} {'were' if it == 'them' else 'was'} for {who}."),
                 (f"What did {h.name} spill?", f"{h.name} spilled flour.")],
                [treat, "flour", "oven", "bowl", "sugar"],
                ("Doing things together is more fun.", "A gift made with love is the best gift."))


def _plot_race(rng: random.Random, c: Cast) -> Plot:
    h, f = c.hero, c.friend
    goal = pick(rng, ("big tree", "red fence", "old gate", "little hill"))
    m = [
        f"One day, {h.name} and {f.name} were playing {c.at}.",
        f'"Let\'s race to the {goal}!" said {f.name}.' if c.talk else f"{f.name} wanted to race to the {goal}.",
        f"They ran as fast as they could. {h.name} was in front.",
        f"Then {f.name} tripped on a stone and fell down.",
        f"{h.name} heard {f.name} cry. {h.He} stopped running and went back.",
        f'"Are you okay?" {h.he} asked, and helped {f.name} up.' if c.talk else f"{h.He} helped {f.name} get up.",
    ]
    e = [f"They walked to the {goal} together, holding hands.", f"Nobody won the race, but both of them were smiling."]
    return Plot(m, e, f"who stops in a race to help a friend",
                [(f"Who fell down?", f"{f.name} fell down."), (f"Where did they race to?", f"They raced to the {goal}."),
                 (f"Who was in front?", f"{h.name} was in front.")],
                [goal.split()[-1], "race", "stone", c.place],
                ("Being kind is better than winning.", "A good friend always helps."))


def _plot_plant(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    plant = pick(rng, ("sunflower", "tomato plant", "pumpkin", "apple tree", "rose bush"))
    m = [
        f"One day, {h.name}'s {c.adult} gave {h.him} a tiny seed.",
        f"{h.name} dug a hole in the garden and put the seed in the dirt.",
        f"Every day, {h.he} gave it water.",
        f'"When will it grow?" {h.name} asked.' if c.talk else f"{h.name} wanted it to grow fast.",
        f"{h.His} {c.adult} smiled and said it needed time.",
        f"One morning, {h.name} saw a small green sprout.",
    ]
    e = [f"The sprout grew and grew, and at the end of the summer it was a big {plant}."]
    return Plot(m, e, f"who plants a seed and waits for it to grow",
                [(f"What grew from the seed?", f"A big {plant} grew from the seed."),
                 (f"Who gave {h.name} the seed?", f"{h.name}'s {c.adult} gave {h.him} the seed.")],
                ["seed", "garden", "water", plant.split()[0]],
                ("Good things take time.", f"{h.name} learned to be patient."))


# (what is out of reach, where it is, how the hero gets it)
_HIGH_UP = (
    ("a red apple", "high up in a tree", "stood on a big box", "box"),
    ("{his} {toy}", "stuck on the roof of the shed", "asked a tall friend to knock it down with a long stick", "stick"),
    ("the cookie jar", "on the top shelf", "asked {his} {adult} to help", "shelf"),
    ("a pretty flower", "at the top of a rocky hill", "climbed slowly and carefully", "hill"),
)


def _plot_out_of_reach(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    thing, where, how, word = pick(rng, _HIGH_UP)
    fill = {"his": h.his, "toy": c.toy, "adult": c.adult}
    thing, how = thing.format(**fill), how.format(**fill)
    m = [
        f"One {c.time}, {h.name} saw {thing} {where}.",
        f'"I want it!" said {h.name}.' if c.talk else f"{h.name} really wanted it.",
        f"{h.He} jumped and jumped, but {h.he} could not reach it.",
        pick(rng, (f"{h.He} sat down and thought very hard.", f"{h.He} did not give up.")),
        f"Then {h.he} had an idea. {h.He} {how}.",
        f"This time {h.he} could reach it!",
    ]
    e = [f"{h.name} smiled from ear to ear."]
    return Plot(m, e, f"who wants {thing} that is {where}",
                [(f"What did {h.name} want?", f"{h.name} wanted {thing}."),
                 (f"How did {h.name} reach it?", f"{h.name} {how}.")],
                [word, "idea", "reach"],
                ("If you think hard, you can solve a problem.", "Never give up."))


def _plot_rain(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    snack = c.food if c.food != "sandwich" else "apple"  # not "sandwiches, juice and a sandwich"
    m = [
        f"{h.name} and {h.his} {c.adult} wanted to have a picnic {c.at}.",
        f"They packed sandwiches, juice and {article(snack)} {snack} in a basket.",
        "But then dark clouds came, and it started to rain.",
        f'"Now we can\'t have our picnic," said {h.name} sadly.' if c.talk else f"{h.name} was very sad.",
        f"{h.His} {c.adult} had an idea. They put a blanket on the floor and had the picnic inside.",
        "They ate the sandwiches and listened to the rain on the window.",
    ]
    e = ["When the rain stopped, they looked outside and saw a big rainbow.", f"It was the best picnic {h.name} ever had."]
    return Plot(m, e, f"whose picnic is spoiled by the rain",
                [(f"What did {h.name} want to do?", f"{h.name} wanted to have a picnic."),
                 ("What did they see when the rain stopped?", "They saw a big rainbow."),
                 ("Where did they have the picnic?", "They had the picnic inside, on a blanket on the floor.")],
                ["picnic", "rain", "rainbow", "blanket", "basket", snack],
                ("You can have fun even when plans change.", "Every cloud can bring a rainbow."))


# (what the hero finds, where, what is inside, the word for it)
_FINDS = (
    ("an old box", "in the attic", "an old toy train that had belonged to grandpa when he was little", "train"),
    ("a little wooden box", "under the bed", "a shiny key and a note that said \"Look in the garden\"", "key"),
    ("a box with holes in it", "on the porch", "a tiny, sleepy kitten", "kitten"),
    ("an old map", "in a drawer", "a path to a big tree in the backyard where a bag of marbles was hidden", "map"),
)


def _plot_mystery(rng: random.Random, c: Cast) -> Plot:
    h = c.hero
    found, where, inside, word = pick(rng, _FINDS)
    m = [
        f"One day, {h.name} found {found} {where}.",
        f'"What is this?" {h.name} wondered.' if c.talk else f"{h.name} was very curious.",
        f"{h.He} showed it to {h.his} {c.adult}, and they opened it together.",
        f"Inside there was {inside}!",
        f"{h.name} could not believe {h.his} eyes.",
    ]
    e = [f"{h.name} and {h.his} {c.adult} talked about it all evening. It was a wonderful surprise."]
    return Plot(m, e, f"who finds {found} {where}",
                [(f"What did {h.name} find?", f"{h.name} found {found} {where}."),
                 (f"What was inside?", f"Inside there was {inside}.")],
                [word, "surprise", where.split()[-1]],
                ("Surprises can be found in the most ordinary places.",))


def _plot_balloon(rng: random.Random, c: Cast) -> Plot:
    # a sad ending: TinyStories has them too, and a model should learn that stories can end badly
    h = c.hero
    m = [
        f"One {c.time}, {h.name}'s {c.adult} bought {h.him} {article(c.color)} {c.color} balloon at the fair.",
        f'"Hold it tight," said {h.his} {c.adult}.' if c.talk else f"{h.His} {c.adult} told {h.him} to hold it tight.",
        f"But then {h.name} saw {h.his} friend {c.friend.name} and waved with both hands.",
        "The balloon floated up, up, up into the sky.",
        f"{h.name} watched it get smaller and smaller until it was gone.",
    ]
    e = [f"{h.name} was sad all the way home."]
    return Plot(m, e, f"who lets go of {h.his} balloon",
                [(f"What did {h.name} lose?", f"{h.name} lost {h.his} {c.color} balloon."),
                 (f"Why did {h.name} let go?", f"{h.name} waved to {c.friend.name} with both hands.")],
                ["balloon", "fair", "sky", c.color],
                (f"Next time, {h.name} will hold on tight.", "It is important to listen."))


PLOTS: dict[str, Callable[[random.Random, Cast], Plot]] = {
    "lost_toy": _plot_lost_toy, "share": _plot_share, "fear": _plot_fear, "help_animal": _plot_help_animal,
    "broken": _plot_broken, "new_friend": _plot_new_friend, "bake": _plot_bake, "race": _plot_race,
    "plant": _plot_plant, "out_of_reach": _plot_out_of_reach, "rain": _plot_rain, "mystery": _plot_mystery,
    "balloon": _plot_balloon,
}
_PLOT_NAMES = tuple(PLOTS)

MIN_STORY_WORDS, MAX_STORY_WORDS = 80, 250


# ---------------------------------------------------------------------------------------------
# 3. a story = opening + plot + ending (+ moral), in one to three paragraphs
# ---------------------------------------------------------------------------------------------


def _opening(rng: random.Random, c: Cast, plot: str) -> list[str]:
    h = c.hero
    adj = pick(rng, HERO_ADJECTIVES)
    first = pick(rng, (
        f"Once upon a time, there was {article(adj)} {adj} {h.kind} named {h.name}.",
        f"Once upon a time, in a small town, there lived {article(adj)} {adj} {h.kind} named {h.name}.",
        f"There was once {article(adj)} {adj} {h.kind} called {h.name}.",
        f"{h.name} was {article(adj)} {adj} {h.kind} who lived in a little house near the {c.place if c.place not in ('backyard', 'garden') else 'woods'}.",
    ))
    activity = pick(rng, ACTIVITIES)
    second = pick(rng, (f"{h.He} loved to {activity}.", f"Every day, {h.name} liked to {activity}.",
                         f"{h.His} favorite thing was to {activity}."))
    roll = rng.random()
    if roll < 0.25:
        return [first, second, f"{h.He} had {article(c.color)} {c.color} {c.toy} that {h.he} loved very much."]
    if roll < 0.45:
        return [first, second, f"{h.He} lived with {h.his} {c.adult}, who always had time for a hug."]
    if roll < 0.6 and plot != "new_friend":  # the friend is met for the first time there
        return [first, second, f"{h.His} best friend was {c.friend.name}, {article(c.friend.kind)} {c.friend.kind} who lived next door."]
    return [first, second]


# a last line for stories that end well (not after the balloon flies away)
HAPPY_CLOSERS = (
    "That night, {n} went to bed with a big smile.", "It was a day {he} would never forget.",
    "{n} could not wait to tell everyone about it.", "And that was a very good day.",
)


def generate_story(rng: random.Random, plot: str | None = None) -> Story:
    """One story from the stream `rng` (optionally of a given plot name, see PLOTS).

    The text is 80-250 words of simple sentences; `qa`, `feature` and `keywords` describe what is in it.
    """
    c = _cast(rng)
    name = plot or _PLOT_NAMES[rng.randrange(len(_PLOT_NAMES))]
    p = PLOTS[name](rng, c)
    opening = _opening(rng, c, name)
    middle = list(p.middle)
    if rng.random() < 0.4:  # a line of scenery, placed just after the opening
        middle.insert(0, pick(rng, SCENERY))
    ending = list(p.ending)
    has_moral = rng.random() < 0.45
    if has_moral:
        ending.append(pick(rng, p.morals))
    if name != "balloon" and rng.random() < 0.35:
        ending.append(pick(rng, HAPPY_CLOSERS).format(n=c.hero.name, he=c.hero.he))

    def assemble() -> str:
        # about half the stories have paragraphs, like TinyStoriesV2
        if rng.random() < 0.5:
            return " ".join(opening) + "\n\n" + " ".join(middle) + "\n\n" + " ".join(ending)
        return " ".join(opening + middle + ending)

    text = assemble()
    # subtle: the short plots can come out under 80 words; pad with scenery the story does not use yet
    spare = [s for s in SCENERY if s not in middle]
    while len(text.split()) < MIN_STORY_WORDS and spare:
        middle.insert(1, spare.pop(rng.randrange(len(spare))))
        text = assemble()
    return Story(text, c.hero, name, p.feature, p.qa, p.keywords, '"' in text, has_moral)


def iter_stories(seed: int, n: int, split: str, exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[Story]:
    """`n` stories from the stream (seed, "stories_" + split), skipping any whose text is in `exclude`."""
    rng = rng_for(seed, f"stories_{split}")
    made = 0
    while made < n:
        story = generate_story(rng)
        if story.text in exclude:
            continue
        made += 1
        yield story


def write_stories(path: str | Path, seed: int, n: int, split: str, exclude: set[str] | frozenset[str] = frozenset(),
                  progress: bool = True) -> dict:
    """Write `n` stories of `iter_stories` in the TinyStories format ("story\\n<|endoftext|>\\n" each), atomically.

    Returns {"count", "bytes"}.
    """
    texts = (story.text for story in iter_stories(seed, n, split, exclude))
    bar = tqdm(texts, total=n, unit=" stories", desc=Path(path).name, disable=not progress, mininterval=0.5)
    return write_story_file(path, bar)


# ---------------------------------------------------------------------------------------------
# 4. small text helpers: what the conversation and preference builders (and the tests) check a story with
# ---------------------------------------------------------------------------------------------


def uses_word(text: str, word: str) -> bool:
    """Does `text` use `word` as a whole word (any case, plural 's'/'es' allowed)?

    >>> uses_word("Lily has two Balls.", "ball"), uses_word("a ballet", "ball")
    (True, False)
    """
    return re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text, flags=re.IGNORECASE) is not None


# a break after . ! ? (or after a closing quote that follows one), unless the next word is lowercase:
# in '"Go!" he said.' the sentence goes on after the quote
_SENTENCE_BREAK = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?![a-z])')


def split_sentences(text: str) -> list[str]:
    """Sentences of a story: 'Hi. "Go!" he said.\\n\\nThe end.' -> ['Hi.', '"Go!" he said.', 'The end.']."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def sentence_ends(text: str) -> list[int]:
    """Character offsets just after each sentence (the split points of `split_sentences`, plus the end)."""
    return [m.start() for m in _SENTENCE_BREAK.finditer(text)] + [len(text.rstrip())]

