"""Sequence sources: which sequences a training batch holds.

A source turns a dataset batch (see :func:`switchkd.data.collate`) into the batch the
loss sees: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and, where it
already has them, ``teacher_logits [B, T, V]`` aligned with ``input_ids``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from switchkd.config import Config


class DatasetSource:
    """Ground-truth responses, unchanged (SFT, word-level KD, BiLD, SeqKD on generated data)."""

    def __init__(self, cfg: Config, student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int) -> None:
        self.cfg, self.student, self.teacher, self.tokenizer, self.vocab = cfg, student, teacher, tokenizer, vocab

    def __call__(self, batch: Dict[str, Tensor], step: int) -> Dict[str, Tensor]:
        return batch

    def stats(self) -> Dict[str, float]:
        """Diagnostics to log (none for the dataset source)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@torch.no_grad()
def teacher_logits(teacher: Any, batch: Dict[str, Tensor]) -> Tensor:
    """One teacher forward over the batch's sequences; ``[B, T, V']``."""
    return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def make_source(cfg: Config, student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int) -> DatasetSource:
    """The source named by ``cfg.method.source``."""
    if cfg.method.source == "dataset":
        return DatasetSource(cfg, student, teacher, tokenizer, vocab)
    raise NotImplementedError(f"method.source={cfg.method.source!r} is not available")
