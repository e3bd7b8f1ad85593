"""The built-in synthetic instruction suite (the demo's default data).

Seven task families with exact references (counting up and down, multiples, letter
ranges, cyclic lists of weekdays and months, repetition) and response lengths from one
byte to 180 (long answers let early errors compound): learnable by a tiny teacher in a
few CPU minutes, and hard to keep exact to the end for a smaller student.  Deterministic by seed;
train/dev/test are disjoint because each prompt's split is fixed by a hash.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Dict, List, Tuple

from switchkd.records import Example

WORDS = (
    "apple river stone cloud tiger maple ocean pencil garden rocket silver window candle forest yellow "
    "planet bridge summer winter dragon violet castle mirror thunder"
).split()
TEMPLATE = "Q: {instruction}\nA: "


DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _count(r: random.Random) -> Tuple[str, str]:
    a = r.randint(0, 60)
    b = a + r.randint(1, 48)
    return f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))


def _countdown(r: random.Random) -> Tuple[str, str]:
    b = r.randint(10, 90)
    a = max(0, b - r.randint(1, 40))
    return f"Count down from {b} to {a}.", " ".join(str(i) for i in range(b, a - 1, -1))


def _multiples(r: random.Random) -> Tuple[str, str]:
    k, n = r.randint(2, 9), r.randint(1, 25)
    return f"List {n} multiples of {k}.", " ".join(str(k * i) for i in range(1, n + 1))


def _letters(r: random.Random) -> Tuple[str, str]:
    a = r.randint(0, 24)
    b = r.randint(a + 1, 25)
    return f"Letters from {LETTERS[a]} to {LETTERS[b]}.", " ".join(LETTERS[a:b + 1])


def _days(r: random.Random) -> Tuple[str, str]:
    start, n = r.randrange(7), r.randint(1, 20)
    return f"List {n} days starting from {DAYS[start]}.", " ".join(DAYS[(start + i) % 7] for i in range(n))


def _months(r: random.Random) -> Tuple[str, str]:
    start, n = r.randrange(12), r.randint(1, 14)
    return f"List {n} months starting from {MONTHS[start]}.", " ".join(MONTHS[(start + i) % 12] for i in range(n))


def _repeat(r: random.Random) -> Tuple[str, str]:
    w, n = r.choice(WORDS), r.randint(1, 16)
    return f"Repeat {w} {n} times.", " ".join([w] * n)


FAMILIES: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "count": _count, "countdown": _countdown, "multiples": _multiples, "letters": _letters,
    "days": _days, "months": _months, "repeat": _repeat,
}
SPLITS = {"train": range(2, 10), "dev": range(1, 2), "test": range(0, 1)}


def split_of(instruction: str) -> str:
    """The split an instruction belongs to (fixed by its hash; 80/10/10)."""
    h = int(hashlib.sha1(instruction.encode()).hexdigest(), 16) % 10
    return next(name for name, r in SPLITS.items() if h in r)


def make_split(split: str, n: int, seed: int = 0) -> List[Example]:
    """``n`` examples of ``split`` (train | dev | test), families in equal turns."""
    if split not in SPLITS:
        from switchkd.sections import ConfigError

        raise ConfigError(f"synthetic:{split}: the built-in suite's split must be one of {', '.join(SPLITS)}")
    r = random.Random(f"{seed}-{split}")
    names = list(FAMILIES)
    out: List[Example] = []
    tries = 0
    while len(out) < n and tries < 200 * n:
        tries += 1
        family = names[len(out) % len(names)]
        instruction, answer = FAMILIES[family](r)
        if split_of(instruction) != split:
            continue
        out.append(Example(prompt=TEMPLATE.format(instruction=instruction), references=[answer],
                           instruction=instruction, meta={"topic": family}))
    return out
