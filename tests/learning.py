"""Preset tests that fail when a method stops learning: the dev objective before training and after it."""

import json
from pathlib import Path
from typing import Any, Tuple

from switchkd.rundir import release_lock
from switchkd.train import Trainer


def train_measured(cfg: Any) -> Tuple[Path, float, float]:
    """Train ``cfg``; returns ``(final/, dev objective of the initial student, the last logged dev objective)``: the
    training objective on the fixed dev references (``data.dev``, ``eval.limit`` examples), teacher-forced."""
    trainer = Trainer(cfg)
    try:
        before = trainer._dev_loss()
        final = trainer.fit()
    finally:
        release_lock(Path(cfg.output.dir))
    records = [json.loads(x) for x in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    return final, before, [r for r in records if "dev_loss" in r][-1]["dev_loss"]


def assert_learns(cfg: Any) -> Path:
    """Train ``cfg`` and assert that its dev objective fell (a method that stopped learning fails here)."""
    final, before, after = train_measured(cfg)
    assert after < before - 1e-3 * abs(before), f"the dev objective did not fall: {before:.4f} -> {after:.4f}"
    return final
