"""What the synthetic speakers say: random everyday sentences, fillers and backchannels.

The sentences only have to sound like conversational English (varied words, so varied
phonemes; statements and questions; hesitations); their meaning does not matter.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sentence", "backchannel"]

_WORDS = {
    "name": ["Anna", "Peter", "Maria", "David", "Sophie", "Tom", "Laura", "Mike", "Julia",
             "Ben", "Kate", "Paul", "Emma", "Sam", "Lisa", "Jack"],
    "noun": ["meeting", "project", "budget", "remote control", "design", "report", "plan",
             "kitchen", "garden", "car", "weekend", "holiday", "book", "movie", "phone",
             "computer", "office", "market", "train", "dinner", "coffee", "team", "idea",
             "problem", "answer", "picture", "song", "game", "house", "job", "school",
             "window", "question", "schedule", "presentation", "prototype", "battery",
             "button", "screen", "price", "customer", "letter", "bike", "river", "city"],
    "verb": ["finish", "change", "move", "check", "build", "buy", "sell", "fix", "test",
             "discuss", "send", "read", "watch", "try", "open", "close", "call", "visit",
             "clean", "paint", "cook", "plan", "book", "cancel", "print", "share", "show"],
    "adj": ["good", "big", "small", "new", "old", "cheap", "expensive", "simple", "strange",
            "nice", "difficult", "easy", "boring", "funny", "quick", "slow", "blue", "round",
            "important", "useful", "beautiful", "awful", "quiet", "busy"],
    "time": ["tomorrow", "next week", "on Monday", "this afternoon", "later", "tonight",
             "on Friday", "in the morning", "before lunch", "after the break", "next year",
             "in ten minutes", "by Thursday", "at the weekend"],
    "place": ["at home", "in the office", "in town", "at the station", "upstairs", "outside",
              "in the meeting room", "downstairs", "at the shop", "near the park"],
    "num": ["two", "three", "five", "seven", "ten", "twelve", "twenty", "fifty", "a hundred"],
    "opener": ["well", "so", "okay", "yeah", "actually", "I mean", "you know", "right",
               "oh", "hmm", "um", "uh", "and", "but"],
}

_TEMPLATES = [
    "I think we should {verb} the {noun} {time}.",
    "{opener}, the {noun} is a bit too {adj} for me.",
    "Did you {verb} the {noun} already?",
    "We could {verb} it {place}, if you want.",
    "{name} said the {noun} was really {adj}.",
    "{opener}, maybe we need {num} more.",
    "Why don't we just {verb} the {adj} one?",
    "I don't know, it looks {adj} to me.",
    "The {noun} costs about {num} euros.",
    "Can you {verb} the {noun} {time}?",
    "{opener}, I was {place} all day yesterday.",
    "That's {adj}, but what about the {noun}?",
    "If we {verb} the {noun}, we can {verb} the {noun} {time}.",
    "{name} and I wanted to {verb} something {adj}.",
    "So the main {noun} is that it's too {adj}.",
    "Honestly, I'd rather {verb} the {noun} {place}.",
    "How many people were at the {noun}?",
    "{opener}, let me think about the {noun} for a second.",
    "It was {adj}, really {adj}, you know.",
    "We have {num} of them {place}, I think.",
    "Is the {noun} {adj} or {adj}?",
    "Oh, I remember that {noun}, it was {adj}.",
    "My {noun} broke, so I had to {verb} a new one.",
    "Let's {verb} the {noun} and then {verb} it {time}.",
    "What do you think about the {adj} {noun}?",
    "{opener}, {name} wants to {verb} the {noun} first.",
    "No, no, the other {noun}, the {adj} one.",
    "I'll {verb} it {time}, I promise.",
    "That sounds {adj}.",
    "Really? {opener}, I didn't know that.",
]

# (text for espeak-ng, text for Festival). espeak-ng reads [[...]] as its own phonemes.
_BACKCHANNELS = [("[[m'm]]", "mm"), ("[[mh'm]]", "uh huh"), ("[[h'@m]]", "hum"),
                 ("yeah", "yeah"), ("right", "right"), ("okay", "okay"),
                 ("uh huh", "uh huh"), ("oh", "oh"), ("I see", "I see"), ("sure", "sure"),
                 ("yes", "yes"), ("true", "true"), ("wow", "wow"), ("exactly", "exactly")]


def sentence(rng: np.random.Generator) -> str:
    """One random sentence (3 to about 15 words) from the templates."""
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    out, rest = [], template
    while "{" in rest:
        head, tail = rest.split("{", 1)
        key, rest = tail.split("}", 1)
        options = _WORDS[key]
        out += [head, options[int(rng.integers(len(options)))]]
    text = "".join(out + [rest])
    return text[0].upper() + text[1:]


def backchannel(rng: np.random.Generator, engine: str) -> str:
    """A short listener response ("mm", "yeah", ...) written for `engine`."""
    espeak_text, festival_text = _BACKCHANNELS[int(rng.integers(len(_BACKCHANNELS)))]
    return espeak_text if engine == "espeak" else festival_text
