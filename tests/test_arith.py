"""The built-in arithmetic suite with worked rationales (the priming experiment's task)."""

from __future__ import annotations

import re

import pytest

from switchkd.arith import MAX_VALUE, make_split, split_of
from switchkd.config import ConfigError, DataConfig
from switchkd.data import load_examples
from switchkd.metrics import accuracy, final_answer
from switchkd.models import tiny_tokenizer


@pytest.mark.parametrize("max_value", [MAX_VALUE, 99])
def test_rationales_are_correct_step_by_step(max_value):
    seen = 0
    for e in make_split("train", 300, max_value=max_value) + make_split("test", 50, max_value=max_value):
        nums = [int(x) for x in re.findall(r"\d+", e.instruction)]
        x = nums[0]
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", e.references[0])
        assert 2 <= len(steps) <= 3 and int(steps[0][0]) == x
        for a, op, b, c in steps:  # each equation holds and chains from the previous result
            assert int(a) == x and int(c) == {"+": x + int(b), "-": x - int(b), "*": x * int(b)}[op]
            x = int(c)
            assert 1 <= x <= max_value  # the default fact table stays small enough for a tiny teacher
            seen = max(seen, x)
        assert final_answer(e.references[0]) == str(x) and accuracy(e.references[0], e.references) == 100.0
    assert seen > max_value * 0.8  # the range is used, not just allowed


def test_splits_are_disjoint_and_deterministic():
    train = {e.instruction for e in make_split("train", 500)}
    test = {e.instruction for e in make_split("test", 60)}
    assert not train & test and all(split_of(q) == "test" for q in test)
    assert [e.references for e in make_split("dev", 20)] == [e.references for e in make_split("dev", 20)]
    assert len(load_examples("arith:dev", DataConfig(), tiny_tokenizer(), limit=7)) == 7
    harder = {e.instruction for e in make_split("train", 500, max_value=99)}
    assert harder != train and not harder & {e.instruction for e in make_split("test", 60, max_value=99)}
    with pytest.raises(ConfigError, match="arith:valid"):
        make_split("valid", 3)

