"""The training batch: one typed record from the data loader to the loss.

Every source returns a :class:`Batch`; a source that decodes rebuilds it around its new responses
with :meth:`Batch.with_responses` (the prompts, the teacher's primed prompts and the example indices
are kept).  Shapes: ``B`` sequences, ``T`` prompt+response positions (right-padded), ``P`` prompt
positions (left-padded, for generation), ``N`` response tokens of the whole batch (row-major).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from switchkd.align import Alignment


def _rows(ids: Tensor, mask: Tensor) -> List[List[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists; returns ``input_ids [B, L]`` and ``attention_mask [B, L]``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask


def right_pad(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> tuple:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` for prompt+response, right-padded;
    labels are -100 outside the response."""
    n = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        if len(r):
            labels[i, len(p): len(seq)] = torch.tensor(list(r), dtype=torch.long)
    return ids, mask, labels


@dataclass
class PolicyTerm:
    """A clipped policy-gradient term per response token (PPO-style; MiniLLM's), ``[N]`` each:
    the advantage, the log-probability the tokens were sampled with, an importance weight, and the
    ratio clip range."""

    advantage: Tensor
    old_logprob: Tensor
    weight: Tensor
    clip: float

    def slice(self, i: int, j: int) -> "PolicyTerm":
        """Response tokens ``i:j``."""
        return PolicyTerm(self.advantage[i:j], self.old_logprob[i:j], self.weight[i:j], self.clip)

    def to(self, device: Any, non_blocking: bool = False) -> "PolicyTerm":
        return PolicyTerm(*(t.to(device, non_blocking=non_blocking) for t in
                            (self.advantage, self.old_logprob, self.weight)), self.clip)


@dataclass
class Batch:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (labels -100 outside the response);
    ``prompt_ids``, ``prompt_mask`` ``[B, P]``; ``index [B]`` (example ids).  With response priming the
    teacher's own ``teacher_input_ids``/``teacher_attention_mask``/``teacher_labels`` ``[B, T']`` and
    ``teacher_prompt_ids``/``teacher_prompt_mask`` ``[B, P']``.  ``teacher_selected``: the teacher's
    logits at the ``N`` response tokens ``[N, V]`` when already known (kept from a rollout, or a sparse
    :class:`switchkd.divergences.TopK` from the teacher cache); ``policy``: a policy-gradient term;
    ``alignment``: with a teacher of another vocabulary, its ``teacher_*`` fields hold the teacher's own
    tokens and this aligns the two responses (:class:`switchkd.cross.CrossView`)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    index: Tensor
    teacher_input_ids: Optional[Tensor] = None
    teacher_attention_mask: Optional[Tensor] = None
    teacher_labels: Optional[Tensor] = None
    teacher_prompt_ids: Optional[Tensor] = None
    teacher_prompt_mask: Optional[Tensor] = None
    teacher_selected: Optional[Any] = None
    policy: Optional[PolicyTerm] = None
    alignment: Optional[Any] = None  # across vocabularies: the responses' switchkd.align.Alignment

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
              index: Sequence[int], teacher_prompts: Optional[Sequence[Sequence[int]]] = None) -> "Batch":
        """A batch of prompt + response token lists (``teacher_prompts``: the teacher's primed prompts)."""
        ids, mask, labels = right_pad(prompts, responses, pad_id)
        p_ids, p_mask = left_pad(prompts, pad_id)
        b = cls(ids, mask, labels, p_ids, p_mask, torch.tensor(list(index), dtype=torch.long))
        if teacher_prompts is not None:
            b.teacher_input_ids, b.teacher_attention_mask, b.teacher_labels = right_pad(teacher_prompts, responses, pad_id)
            b.teacher_prompt_ids, b.teacher_prompt_mask = left_pad(teacher_prompts, pad_id)
        return b

    @property
    def size(self) -> int:
        """B."""
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def prompts(self) -> List[List[int]]:
        return _rows(self.prompt_ids, self.prompt_mask)

    def teacher_prompts(self) -> Optional[List[List[int]]]:
        return _rows(self.teacher_prompt_ids, self.teacher_prompt_mask) if self.teacher_prompt_ids is not None else None

    def responses(self) -> List[List[int]]:
        """Each row's response tokens."""
        return [row[row != -100].tolist() for row in self.labels]

    def response_lengths(self) -> List[int]:
        return (self.labels[:, 1:] != -100).sum(1).tolist()

    def with_responses(self, responses: Sequence[Sequence[int]], pad_id: int) -> "Batch":
        """The same prompts (and indices, and teacher prompts) with new ``responses``, on this device."""
        new = Batch.build(self.prompts(), responses, pad_id, self.index.tolist(), self.teacher_prompts())
        return new.to(self.device)

    def select(self, rows: Sequence[int]) -> "Batch":
        """The sub-batch of ``rows`` (per-token fields dropped: they span all rows)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        kw = {f.name: (getattr(self, f.name).index_select(0, idx) if isinstance(getattr(self, f.name), Tensor)
                       and f.name != "teacher_selected" else None) for f in dataclasses.fields(self)}
        # (teacher_* of another vocabulary keep their rows; the alignment is rebuilt by the CrossView)
        return Batch(**kw)

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (accelerate's data loader calls this)."""
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kw[f.name] = _move(v, device, non_blocking)
        return Batch(**kw)


def _move(value: Any, device: Any, non_blocking: bool) -> Any:
    if isinstance(value, (Tensor, PolicyTerm, Alignment)):
        return value.to(device, non_blocking=non_blocking)
    return value.to(device) if hasattr(value, "to") else value  # a TopK (teacher cache) or None
