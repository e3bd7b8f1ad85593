"""The built-in multi-step arithmetic suite with worked rationales (``data.train=arith``,
``arith:dev``, ``arith:test``): the reasoning task of the response-priming experiment.

A problem chains two or three operations on small numbers ("Start with 7. Add 5. Subtract 3."), every
value in 1..20 (``make_split(..., max_value=99)``: the carrying two-digit variant the priming benchmark
uses); the reference is a worked rationale, one equation per step, ending in GSM8K's answer line
("7 + 5 = 12. 12 - 3 = 9. #### 9"), so ``eval.metric=accuracy`` scores the final number.
Deterministic by seed; splits are disjoint (fixed by a hash of the problem).
"""

from __future__ import annotations

import random
from typing import List, Tuple

from switchkd.records import Example
from switchkd.synthetic import SPLITS, split_of  # noqa: F401  (the same 80/10/10 hash split)

TEMPLATE = "Q: {instruction}\nA: "


MAX_VALUE = 20  # every intermediate value stays in 1..20: a fact table a tiny model can learn on a CPU


def problem(r: random.Random, max_value: int = MAX_VALUE) -> Tuple[str, str, int]:
    """``(question, worked rationale, answer)`` for one random problem (values in 1..max_value; the
    operands of additions and subtractions in 1..9, multipliers 2 or 3)."""
    x = r.randint(1, 9)
    words, steps = [f"Start with {x}."], []
    for _ in range(r.randint(2, 3)):
        ops = [op for op, ok in (("add", x < max_value), ("sub", x > 1), ("mul", 2 * x <= max_value)) if ok]
        op = r.choice(ops)
        if op == "add":
            y = r.randint(1, min(9, max_value - x))
            words.append(f"Add {y}.")
            steps.append(f"{x} + {y} = {x + y}.")
            x += y
        elif op == "sub":
            y = r.randint(1, min(9, x - 1))
            words.append(f"Subtract {y}.")
            steps.append(f"{x} - {y} = {x - y}.")
            x -= y
        else:
            y = r.choice([k for k in (2, 3) if k * x <= max_value])
            words.append(f"Multiply by {y}.")
            steps.append(f"{x} * {y} = {x * y}.")
            x *= y
    return " ".join(words), " ".join(steps + [f"#### {x}"]), x


def make_split(split: str, n: int, seed: int = 0, max_value: int = MAX_VALUE) -> List[Example]:
    """``n`` examples of ``split`` (train | dev | test), every value in 1..``max_value`` (the default
    suite: 20; ``bench/priming.py --max-value 99`` makes carrying two-digit arithmetic that a tiny teacher
    cannot compute but can copy from a ground-truth prefix)."""
    if split not in SPLITS:
        from switchkd.sections import ConfigError

        raise ConfigError(f"arith:{split}: the arithmetic suite's split must be one of {', '.join(SPLITS)}")
    tag = f"arith-{seed}-{split}" if max_value == MAX_VALUE else f"arith{max_value}-{seed}-{split}"
    r, out, tries = random.Random(tag), [], 0
    while len(out) < n and tries < 200 * n:
        tries += 1
        question, rationale, _ = problem(r, max_value)
        if split_of(question) == split:
            out.append(Example(prompt=TEMPLATE.format(instruction=question), references=[rationale],
                               instruction=question, meta={"topic": "arith"}))
    return out
