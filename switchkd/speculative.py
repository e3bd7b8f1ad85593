"""Speculative SWITCH rollouts: the same tokens as the lockstep rule at near on-policy cost.

The student drafts k tokens with its cache; the teacher scores all k positions in one
forward.  Positions before the first one where *any* row's gate exceeds tau_t are the
student's tokens under the SWITCH rule for every row; at that position each row takes the
teacher's token where its gate exceeds tau_t, else its draft token.  Both caches are cropped
to the decided prefix and the last decided token is fed (to the teacher together with the
next draft, so each block costs one teacher forward), so the next block starts from exactly
the state the lockstep engine would have.  Under greedy decoding the tokens equal
the lockstep engine's; under sampling each decided token is drawn from the same
distribution as in lockstep (a student draft at a position where the gate does not exceed
tau_t *is* a sample of the student's distribution there; where it exceeds, the teacher is
sampled), so the sequence distribution is the same, though a seeded run consumes random
numbers in a different order.  Each block's k minimises the expected cost per decided token,
(c + k) / E[decided], from a running estimate of the per-position rejection rate r
(E[decided] = (1 - (1 - r)^k) / r) and the teacher/student forward-cost ratio c; with frequent
rejections it falls to k = 1, which costs what lockstep costs.  k depends only on past
decisions, so a seeded run is reproducible.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from switchkd.rollout import RolloutConfig, RolloutOutput, _setup, _Stepper, threshold


@torch.no_grad()
def speculative_switch(student: Any, teacher: Any, input_ids: Tensor, attention_mask: Tensor, cfg: RolloutConfig,
                       teacher_input_ids: Optional[Tensor] = None,
                       teacher_attention_mask: Optional[Tensor] = None) -> RolloutOutput:
    """SWITCH by draft-and-verify; same output contract as :func:`switchkd.rollout.rollout`."""
    device = input_ids.device
    vocab, eos_ids, pad, choose, gate_fn = _setup(student, cfg, device)
    s = _Stepper(student, input_ids, attention_mask, vocab)
    tt = _Stepper(teacher, teacher_input_ids if teacher_input_ids is not None else input_ids,
                  teacher_attention_mask if teacher_attention_mask is not None else attention_mask, vocab)
    B, N = input_ids.shape[0], cfg.max_new_tokens
    tokens = torch.full((B, N), pad, dtype=torch.long, device=device)
    resp = torch.zeros((B, N), dtype=torch.bool, device=device)
    from_t = torch.zeros_like(resp)
    gate = torch.full((B, N), float("nan"), device=device)
    kept = torch.zeros((B, N, vocab), device=device) if cfg.keep_teacher_logits else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    t, k = 0, max(1, cfg.draft_k)
    pending: Optional[Tensor] = None  # the last decided token, not yet fed to the teacher
    cost = cfg.teacher_cost if cfg.teacher_cost is not None else _cost_ratio(teacher, student)
    rejected, examined = 0.0, 0.0  # decayed counts behind the rejection-rate estimate
    while t < N and not bool(done.all()):
        kk = min(k, N - t)
        s_len, t_len = s.mask.shape[1], tt.mask.shape[1] + (pending is not None)
        q_list, drafts = [], []
        for j in range(kk):  # the student drafts kk tokens
            q_list.append(s.logits)
            drafts.append(choose(s.logits))
            if j < kk - 1:
                s.advance(drafts[-1])
        D, Q = torch.stack(drafts, 1), torch.stack(q_list, 1)  # [B, kk], [B, kk, V]
        P = _verify(tt, pending, D)  # [B, kk, V] in one teacher forward
        d = gate_fn(Q, P)  # [B, kk]
        tau = torch.tensor([threshold(t + j, cfg) for j in range(kk)], device=device)
        exceed = (d > tau) & ~done[:, None]
        first = torch.where(exceed.any(1), exceed.float().argmax(1), torch.full_like(done, kk, dtype=torch.long))
        m = int(first.min())
        n_dec = min(m + 1, kk)
        for j in range(n_dec):
            by_t = exceed[:, j]
            tok = torch.where(by_t, choose(P[:, j]), D[:, j]) if bool(by_t.any()) else D[:, j]
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens[:, t + j], resp[:, t + j], from_t[:, t + j], gate[:, t + j] = tok, ~done, by_t & ~done, d[:, j]
            if kept is not None:
                kept[:, t + j] = P[:, j]
            done = done | torch.isin(tok, eos_ids)
        t += n_dec
        if t >= N or bool(done.all()):
            break
        s.crop(s_len + n_dec - 1)
        tt.crop(t_len + n_dec - 1)
        pending = tokens[:, t - 1]
        s.advance(pending)  # the student needs its next logits now; the teacher gets it with the next draft
        rejected, examined = 0.9 * rejected + (m < kk), 0.9 * examined + n_dec  # about the last 10 blocks
        k = next_k((rejected + 0.1) / (examined + 1.0), cost, cfg.max_draft_k)  # a weak prior: r = 0.1
    return RolloutOutput(torch.cat([input_ids, tokens], dim=1), resp, from_t, gate, kept)


def _verify(tt: _Stepper, pending: Optional[Tensor], drafts: Tensor) -> Tensor:
    """Teacher logits at each of the ``drafts [B, kk]`` positions, ``[B, kk, V]``, in at most one forward:
    the pending decided token and all drafts but the last are fed together."""
    if pending is None:
        return tt.logits[:, None] if drafts.shape[1] == 1 else torch.cat([tt.logits[:, None], tt.feed(drafts[:, :-1])], 1)
    return tt.feed(torch.cat([pending[:, None], drafts[:, :-1]], 1))


def next_k(r: float, cost: float, max_k: int) -> int:
    """The draft length in ``1..max_k`` minimising ``(cost + k) / E[decided tokens]`` when each
    position is rejected with probability ``r``: a block costs one teacher forward (``cost``
    student forwards) and ``k`` student forwards, and decides ``(1 - (1 - r)^k) / r`` tokens."""
    def per_token(k: int) -> float:
        return (cost + k) / (k if r <= 0 else (1 - (1 - r) ** k) / r)

    return min(range(1, max(1, max_k) + 1), key=per_token)


def _cost_ratio(teacher: Any, student: Any) -> float:
    """Teacher/student layer counts (parameter counts when a config has none): a one-token forward
    of a small model costs about per layer; override with ``RolloutConfig.teacher_cost``."""
    layers = [getattr(getattr(m, "config", None), "num_hidden_layers", None) for m in (teacher, student)]
    if all(isinstance(n, int) and n > 0 for n in layers):
        return layers[0] / layers[1]
    return sum(p.numel() for p in teacher.parameters()) / max(1, sum(p.numel() for p in student.parameters()))

