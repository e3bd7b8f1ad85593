"""The training objective: kd_ratio * divergence + (1 - kd_ratio) * CE over response tokens.

Normalisation: the loop sums :func:`token_loss` over the response tokens of each
micro-batch and divides by the number of response tokens in the whole
optimizer step (all micro-batches, all processes), so the gradient does not
depend on how a step is split.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from switchkd.config import MethodConfig
from switchkd.divergences import ce, divergence


def kd_weight(method: MethodConfig) -> float:
    """Weight of the divergence term (0 for methods trained by CE alone)."""
    return 0.0 if method.name in ("sft", "seqkd") or method.divergence == "ce" else method.kd_ratio


def token_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], labels: Tensor, method: MethodConfig) -> Tensor:
    """Per-token loss ``[N]`` from logits ``[N, V]`` and target ids ``[N]``."""
    w = kd_weight(method)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if w > 0:
        if teacher_logits is None:
            raise ValueError(f"method {method.name!r} with kd_ratio={w} needs teacher logits")
        params = {k: (int(v) if k == "k" else v) for k, v in method.params.items()}
        out = out + w * divergence(method.divergence, student_logits, teacher_logits, temperature=method.temperature,
                                   **params)
    if w < 1:
        out = out + (1 - w) * ce(student_logits, labels=labels)
    return out


def shifted(logits: Tensor, labels: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Select next-token logits at response positions.

    ``logits [B, T, V']``, ``labels [B, T]`` (-100 outside the response) ->
    ``(logits [N, vocab], targets [N])`` with N the number of response tokens.
    """
    target = labels[:, 1:]
    mask = target != -100
    return logits[:, :-1][mask][:, :vocab], target[mask]


def response_tokens(labels: Tensor) -> int:
    """Number of predicted response tokens in ``labels [B, T]``."""
    return int((labels[:, 1:] != -100).sum())
