"""The built-in synthetic instruction suite (the demo's default data).

Several task families with exact references and response lengths from a few
bytes to 150+ (long answers let early errors compound).  Deterministic by seed;
train/dev/test are disjoint because each prompt's split is fixed by a hash.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Dict, List, Tuple

from switchkd.data import Example

WORDS = (
    "apple river stone cloud tiger maple ocean pencil garden rocket silver window candle forest yellow "
    "planet bridge summer winter dragon violet castle mirror thunder"
).split()
TEMPLATE = "Q: {instruction}\nA: "


def _count(r: random.Random) -> Tuple[str, str]:
    a = r.randint(0, 60)
    b = a + r.randint(2, 45)
    return f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))


def _reverse(r: random.Random) -> Tuple[str, str]:
    w = r.choice(WORDS) + r.choice(WORDS)
    return f"Reverse the letters of {w}.", w[::-1]


def _repeat(r: random.Random) -> Tuple[str, str]:
    w, n = r.choice(WORDS), r.randint(2, 16)
    return f"Repeat {w} {n} times.", " ".join([w] * n)


def _spell(r: random.Random) -> Tuple[str, str]:
    w = r.choice(WORDS)
    return f"Spell {w}.", "-".join(w)


def _sort(r: random.Random) -> Tuple[str, str]:
    ws = r.sample(WORDS, r.randint(3, 10))
    return f"Sort: {' '.join(ws)}.", " ".join(sorted(ws))


def _upper(r: random.Random) -> Tuple[str, str]:
    ws = r.sample(WORDS, r.randint(2, 8))
    return f"Uppercase: {' '.join(ws)}.", " ".join(ws).upper()


def _multiples(r: random.Random) -> Tuple[str, str]:
    k, n = r.randint(2, 9), r.randint(3, 25)
    return f"List {n} multiples of {k}.", " ".join(str(k * i) for i in range(1, n + 1))


FAMILIES: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "count": _count, "reverse": _reverse, "repeat": _repeat, "spell": _spell,
    "sort": _sort, "upper": _upper, "multiples": _multiples,
}
SPLITS = {"train": range(2, 10), "dev": range(1, 2), "test": range(0, 1)}


def split_of(instruction: str) -> str:
    """The split an instruction belongs to (fixed by its hash; 80/10/10)."""
    h = int(hashlib.sha1(instruction.encode()).hexdigest(), 16) % 10
    return next(name for name, r in SPLITS.items() if h in r)


def make_split(split: str, n: int, seed: int = 0) -> List[Example]:
    """``n`` examples of ``split`` (train | dev | test), families in equal turns."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {', '.join(SPLITS)}, got {split!r}")
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
