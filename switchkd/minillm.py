"""MiniLLM (Gu et al., ICLR 2024) as a sequence source x loss, by the rules of the official code
(microsoft/LMOps ``minillm/``: ``sampler.py``, ``losses.py``; defaults from ``arguments.py`` and
the GPT-2 scripts).

Sequences (:class:`MinillmSource`): the student samples each response from the teacher-mixed
distribution ``p~ = a p + (1 - a) q`` (``method.minillm.teacher_mix`` = a; the rollout engine's
``mixed`` source), in eval mode; each rollout batch is then trained on ``ppo_epochs`` times in a row
with its old log-probabilities fixed.  Per response token t of a sampled sequence:

- reward ``r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scale, +-reward_clip)``;
- advantage ``A_t = sum_{t' >= t} gamma^(t'-t) r_t' / L_t`` with ``L_t`` the number of tokens from t
  on (``length_norm=count``, LMOps), ``sum_{t' >= t} gamma^(t'-t)`` (``discounted``, TRL's
  ``_compute_advantage``) or 1 (``none``); then whitened (``whiten``, LMOps) over the batch's
  ``[B, R]`` block of responses (R = the longest; shorter rows padded with zeros, as LMOps' generation
  block) and detached;
- importance weight ``w_t = q_old(y_t) / p~(y_t)`` (1 when ``teacher_mix`` = 0).

The loss per token is ``method.divergence`` (MiniLLM's single-step decomposition: ``rkl``, the exact
reverse KL over the vocabulary, on the teacher logits the rollout kept) plus the clipped policy term
:func:`switchkd.losses.policy_loss`; the batch carries ``pg_advantage``, ``pg_old_logprob`` and
``pg_weight`` ``[N]`` (response tokens, row-major) for it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from switchkd.decoding import mix_logprobs
from switchkd.sources import Batch, DatasetSource


def rewards(teacher_lp: Tensor, student_lp: Tensor, mask: Tensor, scale: float = 1.0, clip: float = math.inf) -> Tensor:
    """Per-token rewards ``[B, T]``: ``(log p - log q_old) / scale`` clipped to ``+-clip``, 0 off ``mask``."""
    r = ((teacher_lp - student_lp) * mask) / scale
    return r.clamp(-clip, clip) if math.isfinite(clip) else r


def whiten(x: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over every element of ``x`` (padding included, unbiased
    variance, statistics over all processes when distributed), as LMOps ``utils.whiten``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
        dist.all_reduce(stats)
        mean = stats[0] / stats[1]
        var = ((x - mean) ** 2).sum()
        dist.all_reduce(var)
        var = var / stats[1]  # LMOps' distributed branch: the population variance
    else:
        var, mean = torch.var_mean(x)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def advantages(r: Tensor, mask: Tensor, gamma: float, length_norm: str = "count", whitened: bool = False) -> Tensor:
    """Reward-to-go ``[B, T]`` from rewards ``r [B, T]`` (0 off ``mask``), normalised by the remaining
    length (``count`` | ``discounted`` | ``none``) and optionally whitened; detached."""
    r, m = r.double(), mask.double()
    gap = torch.arange(r.shape[1], device=r.device, dtype=r.dtype)
    gap = gap[:, None] - gap[None, :]  # [i, t] = i - t
    discount = torch.where(gap >= 0, torch.pow(gamma, gap.clamp(min=0)), 0.0)  # [i, t] = gamma^(i-t), i >= t
    out = r @ discount  # sum_{i >= t} gamma^(i-t) r_i
    if length_norm != "none":
        lens = m @ (discount if length_norm == "discounted" else (gap >= 0).to(r.dtype))
        out = out / lens.masked_fill(lens == 0, 1.0)
    out = out * m
    return (whiten(out) if whitened else out).float().detach()


def importance_weight(student_lp: Tensor, teacher_lp: Tensor, alpha: float) -> Tensor:
    """``q(y) / (alpha p(y) + (1 - alpha) q(y))`` from the sampled tokens' log-probabilities (any shape)."""
    return torch.exp(student_lp - mix_logprobs(student_lp, teacher_lp, alpha))


def _spread(values: Tensor, mask: Tensor) -> Tensor:
    """Response-token values ``[N]`` (row-major) laid out as ``[B, R]`` by ``mask`` (0 elsewhere)."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


class MinillmSource(DatasetSource):
    """MiniLLM's sequences and per-token policy-gradient fields (see the module docstring).

    Rollouts belong to optimizer steps: a step's ``train.grad_accum`` micro-batches are each rolled out
    once (LMOps' ``chunk_size`` x ``gradient_accumulation_steps`` samples per PPO batch), and the same
    micro-batches are the next ``ppo_epochs - 1`` steps' too, so each rollout gets ``ppo_epochs``
    updates and no prompt batch is drawn and discarded.  The student trains without dropout (LMOps: "no
    dropout for RL")."""

    dropout = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held: Optional[List[Batch]] = None
        self.uses = 0
        self.sums = {"reward": 0.0, "weight": 0.0, "tokens": 0.0}

    def __call__(self, batch: Batch, step: int) -> Batch:
        """One fresh rollout of ``batch`` with its policy-gradient fields."""
        new, out = self._rollout(batch, "mixed", keep_teacher=True)
        new.update(self.fields(new, out.logprobs[out.response_mask]))
        return new

    def step_batches(self, batches: Iterator[Batch], step: int, n: int) -> List[Batch]:
        """The held rollouts while they have PPO epochs left, else ``n`` fresh ones."""
        if self.held is not None and len(self.held) == n and self.uses < self.cfg.method.minillm.ppo_epochs:
            self.uses += 1
            device = self.held[0]["input_ids"].device
            return [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in b.items()} for b in self.held]
        self.held, self.uses = [self(next(batches), step) for _ in range(n)], 1
        return self.held

    @torch.no_grad()
    def fields(self, batch: Batch, s_lp: Tensor) -> Dict[str, Tensor]:
        """``pg_advantage``, ``pg_old_logprob``, ``pg_weight`` ``[N]`` for a rolled-out batch, from the
        student's log-probabilities of its tokens as the rollout drew them ``s_lp [N]`` (eval mode)."""
        m = self.cfg.method.minillm
        y = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        t_lp = torch.log_softmax(batch["teacher_selected"].float(), -1).gather(-1, y[:, None]).squeeze(-1)
        n = (batch["labels"][:, 1:] != -100).sum(1)  # each row's response tokens, left-aligned in [B, R]:
        mask = torch.arange(int(n.max()), device=n.device)[None, :] < n[:, None]  # LMOps' generation block
        r = rewards(_spread(t_lp, mask), _spread(s_lp, mask), mask, m.reward_scale, m.reward_clip)
        adv = advantages(r, mask, m.gamma, m.length_norm, m.whiten)[mask]
        w = importance_weight(s_lp, t_lp, m.teacher_mix)
        self.sums["reward"] += float(r[mask].sum())
        self.sums["weight"] += float(w.sum())
        self.sums["tokens"] += float(mask.sum())
        return {"pg_advantage": adv, "pg_old_logprob": s_lp, "pg_weight": w}

    def stats(self) -> Dict[str, float]:
        n = self.sums["tokens"]
        if n == 0:
            return {}
        out = {"minillm/reward": self.sums["reward"] / n, "minillm/weight": self.sums["weight"] / n}
        self.sums = dict.fromkeys(self.sums, 0.0)
        return out

    def state_dict(self) -> Dict[str, Any]:
        held = [{k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in b.items()} for b in self.held] \
            if self.held else None
        return super().state_dict() | {"held": held, "uses": self.uses}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        held = state.get("held")
        self.held, self.uses = ([held] if isinstance(held, dict) else held), state.get("uses", 0)
