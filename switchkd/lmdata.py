"""Pre-training text for the LM loss that DistiLLM and MiniLLM add to distillation
(``--lm-data-dir``, ``--lm-coef``): ``method.lm_data`` and ``method.lm_weight``.

Every micro-batch of the instruction data is paired with a batch of ``train.batch_size`` chunks of
pre-training text; the objective gains ``lm_weight x`` the student's mean next-token cross-entropy
over that batch (the official ``pt_loss``: ``CrossEntropyLoss`` over all its tokens).  Text is read
from a ``.txt`` file (documents separated by blank lines) or a ``.jsonl``/``.json``/``.parquet`` file
(or hub dataset) with a ``text`` field, tokenized, joined with EOS and packed into chunks of
``data.max_length`` tokens, as MiniLLM's pre-training data is.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from switchkd.data import read_records
from switchkd.sections import ConfigError


def read_texts(source: str) -> List[str]:
    """The documents of ``source`` (see the module docstring); raises :class:`ConfigError`."""
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise ConfigError(f"method.lm_data={source}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read it as UTF-8 text ({exc})") from None
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    texts = []
    for i, row in enumerate(read_records(source)):
        if not isinstance(row.get("text"), str):
            raise ConfigError(f"{source}: record {i + 1} has no string field 'text' (pre-training text for method.lm_data)")
        texts.append(row["text"])
    return texts


def pack(texts: List[str], tokenizer: Any, length: int) -> List[List[int]]:
    """Tokenize, join with EOS and cut into chunks of ``length`` tokens (the last partial chunk dropped)."""
    stream: List[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


class LMStream:
    """Shuffled chunks, this process's share (``rank::world``), reshuffled each pass; resumable."""

    def __init__(self, source: str, tokenizer: Any, length: int, seed: int, rank: int = 0, world: int = 1,
                 texts: "List[str] | None" = None) -> None:
        """``source``: a path (see the module docstring); ``texts``: its documents when already read."""
        chunks = pack(read_texts(source) if texts is None else texts, tokenizer, length)
        if len(chunks) < world:
            raise ConfigError(f"method.lm_data={source}: holds {len(chunks)} chunks of {length} tokens "
                              f"(data.max_length); need at least {world}")
        self.chunks, self.seed, self.rank, self.world = chunks, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._order()

    def _order(self) -> None:
        idx = list(range(len(self.chunks)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(idx)
        self.order = idx[self.rank::self.world]

    def next(self, batch_size: int, device: torch.device) -> Dict[str, Tensor]:
        """``input_ids``/``labels [B, L]`` (every token is predicted; no padding)."""
        rows = []
        for _ in range(batch_size):
            if self.pos >= len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order()
            rows.append(self.chunks[self.order[self.pos]])
            self.pos += 1
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order()


def lm_loss(model: Any, batch: Dict[str, Tensor]) -> Tensor:
    """The student's mean next-token cross-entropy over the batch (a scalar), DistiLLM's ``pt_loss``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
