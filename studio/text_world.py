"""The procedural text world of the mini LM, and the sample adapter task judged on it.

The world is a fixed table of things, each with one colour and one place ("a frog is green",
"you find a frog in the river"). The mini LM's training corpus is made of three kinds of
documents drawn from that table with a seed: fact sentences, question/answer pairs in a plain
format, and short stories that only put a thing where it belongs. Everything is written by
this module; no outside text ships with the studio.

The sample adapter task is **pirate answers**: the same questions, answered as

    Q: What colour is a frog?
    A: Arr! A frog be green, matey.

An adapter is trained on the pirate answers for the things in ``PIRATE_TRAIN`` and judged on
the held-out things (whose facts the base knows from its corpus, whose pirate answers it never
saw). :func:`judge_answer` is the metric: the *format* holds when the answer starts with
``Arr!`` and ends with ``, matey.``; the *fact* holds when it names the right colour or place.
A good adapter lifts the format rate from 0 to ~1 while keeping the fact rate of the base.

This module imports nothing of ours but the error type: the trainers, the benchmarks and the
tests read the same table.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

# thing -> (colour, place). Articles: every thing starts with a consonant sound, so "a" fits.
THINGS: dict[str, tuple[str, str]] = {
    "tomato": ("red", "kitchen"), "banana": ("yellow", "kitchen"), "lemon": ("yellow", "kitchen"),
    "cherry": ("red", "kitchen"), "plum": ("purple", "kitchen"), "cup": ("white", "kitchen"),
    "pot": ("black", "kitchen"), "carrot": ("orange", "garden"), "rose": ("red", "garden"),
    "tulip": ("pink", "garden"), "snail": ("brown", "garden"), "worm": ("pink", "garden"),
    "bee": ("yellow", "garden"), "frog": ("green", "river"), "duck": ("white", "river"),
    "trout": ("grey", "river"), "reed": ("green", "river"), "beaver": ("brown", "river"),
    "whale": ("blue", "sea"), "crab": ("red", "sea"), "shark": ("grey", "sea"), "seal": ("grey", "sea"),
    "wolf": ("grey", "forest"), "bear": ("brown", "forest"), "fox": ("orange", "forest"),
    "mushroom": ("white", "forest"), "pine": ("green", "forest"), "cow": ("black", "farm"),
    "pig": ("pink", "farm"), "hen": ("brown", "farm"), "goat": ("white", "farm"), "tractor": ("red", "farm"),
    "camel": ("brown", "desert"), "cactus": ("green", "desert"), "lizard": ("orange", "desert"),
    "scorpion": ("black", "desert"), "bat": ("black", "cave"), "crystal": ("purple", "cave"),
    "spider": ("grey", "cave"), "bus": ("yellow", "city"), "taxi": ("yellow", "city"),
    "pigeon": ("grey", "city"), "tram": ("blue", "city"), "cloud": ("white", "sky"),
    "kite": ("blue", "sky"), "crow": ("black", "sky"), "parrot": ("green", "sky"),
    "pencil": ("yellow", "school"), "book": ("blue", "school"), "desk": ("brown", "school"),
}
COLOURS = sorted({c for c, _ in THINGS.values()})
PLACES = sorted({p for _, p in THINGS.values()})
NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lea", "Max", "Ida", "Leo", "Zoe")
MOODS = ("happy", "sleepy", "hungry", "curious", "quiet", "busy")
_THINGS_SORTED = sorted(THINGS)
# every fourth thing is held out of the adapter's training set: the metric is read on those
PIRATE_EVAL: tuple[str, ...] = tuple(_THINGS_SORTED[i] for i in range(0, len(_THINGS_SORTED), 4))
PIRATE_TRAIN: tuple[str, ...] = tuple(t for t in _THINGS_SORTED if t not in PIRATE_EVAL)

PIRATE_START = "Arr!"
PIRATE_END = ", matey."


@dataclass(frozen=True)
class Question:
    thing: str
    kind: str
    """``colour`` or ``place``."""

    @property
    def prompt(self) -> str:
        if self.kind == "colour":
            return f"Q: What colour is a {self.thing}?\nA:"
        return f"Q: Where do you find a {self.thing}?\nA:"

    @property
    def truth(self) -> str:
        colour, place = THINGS[self.thing]
        return colour if self.kind == "colour" else place

    def plain_answer(self) -> str:
        if self.kind == "colour":
            return f" A {self.thing} is {self.truth}."
        return f" You find a {self.thing} in the {self.truth}."

    def pirate_answer(self) -> str:
        if self.kind == "colour":
            return f" {PIRATE_START} A {self.thing} be {self.truth}{PIRATE_END}"
        return f" {PIRATE_START} Ye find a {self.thing} in the {self.truth}{PIRATE_END}"


def questions(things: tuple[str, ...] | list[str]) -> list[Question]:
    return [Question(t, kind) for t in things for kind in ("colour", "place")]


def _fact(rng: random.Random) -> str:
    thing = rng.choice(_THINGS_SORTED)
    colour, place = THINGS[thing]
    return rng.choice([f"A {thing} is {colour}.", f"You find a {thing} in the {place}.",
                       f"A {thing} is {colour}. You find a {thing} in the {place}.",
                       f"In the {place} there is a {colour} {thing}."])


def _qa(rng: random.Random) -> str:
    pairs = [rng.choice(questions(_THINGS_SORTED)) for _ in range(rng.randint(1, 3))]
    return "\n".join(q.prompt + q.plain_answer() for q in pairs)


def _story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    place = rng.choice(PLACES)
    here = [t for t in _THINGS_SORTED if THINGS[t][1] == place]
    first, second = rng.sample(here, 2) if len(here) > 1 else (here[0], here[0])
    mood = rng.choice(MOODS)
    lines = [f"{name} went to the {place}.", f"{name} saw a {THINGS[first][0]} {first}.",
             rng.choice([f"The {first} was {mood}.", f"{name} was {mood}.", f"{name} liked the {first}."]),
             f"Then {name} saw a {THINGS[second][0]} {second} too.",
             rng.choice([f"{name} went home.", f"It was a good day in the {place}.", f"{name} sat down."])]
    return " ".join(lines[: rng.randint(3, 5)])


def _pirate_tale(rng: random.Random) -> str:
    """A pirate in a story: the base learns the words (Arr, ye, be, matey), never the pirate Q/A format."""
    thing = rng.choice(_THINGS_SORTED)
    colour, place = THINGS[thing]
    name = rng.choice(NAMES)
    return " ".join([f"{name} met a pirate by the {rng.choice(['sea', 'river', 'city'])}.",
                     rng.choice(['"Arr!" said the pirate.', '"Ahoy, matey!" said the pirate.']),
                     rng.choice([f'"Ye find a {thing} in the {place}, matey."', f'"A {thing} be {colour}, matey."',
                                 f'"Arr! I like a {colour} {thing}."']),
                     f"{name} was {rng.choice(MOODS)}."])


def corpus_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of the base corpus: 30 % facts, 40 % plain Q/A, 25 % stories, 5 % pirate tales.

    The pirate tales make the pirate words ordinary tokens of the base (a real LM knows pirate talk
    too); without them the byte-level tokens of "Arr" and "matey" keep untrained embeddings and an
    adapter of the attention / MLP layers can hardly make the model emit them."""
    rng = random.Random(seed)
    makers = [_fact] * 6 + [_qa] * 8 + [_story] * 5 + [_pirate_tale]
    return [rng.choice(makers)(rng) for _ in range(n)]


def pirate_records(things: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """Instruction records ``{"prompt", "response"}`` of the pirate task for ``things``."""
    return [{"prompt": q.prompt, "response": q.pirate_answer()} for q in questions(things)]


def pirate_stories(n: int, seed: int = 1) -> str:
    """Plain text in pirate voice (for the packed-text training mode): one story a paragraph."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n):
        q = rng.choice(questions(PIRATE_TRAIN))
        paragraphs.append(q.prompt + q.pirate_answer() + "\n" +
                          _story(rng).replace(" was ", " be ").replace(" saw ", " spied ") + " Arr!")
    return "\n\n".join(paragraphs) + "\n"


@dataclass(frozen=True)
class Judgement:
    format_ok: bool
    fact_ok: bool


def judge_answer(question: Question, answer: str) -> Judgement:
    """The pirate metric for one generated answer (the text after ``A:``, up to the newline)."""
    text = answer.strip().split("\n")[0].strip()
    words = {w.strip(".,!?").lower() for w in text.split()}
    return Judgement(format_ok=text.startswith(PIRATE_START) and text.endswith(PIRATE_END),
                     fact_ok=question.truth in words and not (words & (set(COLOURS + PLACES) - {question.truth})))


def summarise(judgements: list[Judgement]) -> dict[str, float]:
    n = max(len(judgements), 1)
    return {"format": sum(j.format_ok for j in judgements) / n,
            "fact": sum(j.fact_ok for j in judgements) / n,
            "both": sum(j.format_ok and j.fact_ok for j in judgements) / n}


def write_jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
