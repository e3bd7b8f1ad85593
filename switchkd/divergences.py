"""Per-token divergences between teacher and student next-token distributions.

Every entry of :data:`DIVERGENCES` is a pure function
``f(student_logits, teacher_logits, *, temperature=1.0, **params) -> Tensor``
taking logits of shape ``[..., V]`` and returning per-token values in nats of
shape ``[...]`` (``logits.shape[:-1]``).  ``p`` is the teacher distribution,
``q`` the student distribution, both ``softmax(logits / temperature)``.

All functions work in log space on at least float32, and accept ``-inf``
logits (masked vocabulary entries) without producing NaN values or gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

from switchkd.divergence_table import PARAMS, SERVED  # noqa: F401  (the declarations, without torch)

_NEG = -1e30  # finite stand-in for -inf logits (keeps 0 * (a - b) finite)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` in >= float32; ``[..., V] -> [..., V]``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).clamp(min=_NEG)
    return torch.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v); ``[..., V] -> [...]``.

    Terms with ``a_v == 0`` contribute exactly 0 (and no NaN gradient).
    """
    a = log_a.exp()
    keep = a > 0
    diff = torch.where(keep, log_a, 0.0) - torch.where(keep, log_b, 0.0)
    return (a * diff).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w * a + (1 - w) * b)`` for ``0 <= w <= 1``, in log space; ``[..., V]``."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {w}")
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl_finite(log_a: Tensor, log_b: Tensor) -> Tensor:
    """:func:`kl_from_log_probs` for finite log-probabilities (as :func:`log_probs` gives), without
    gradient: no guards needed (``0 * finite = 0``), three passes over ``[..., V]`` instead of six."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _value(kind: str, lq: Tensor, lp: Tensor, w: float, kl: Callable[[Tensor, Tensor], Tensor] = kl_from_log_probs) -> Tensor:
    """Per-token value of ``kind`` from student/teacher log-probabilities ``[..., V] -> [...]``."""
    if kind == "fkl":
        return kl(lp, lq)
    if kind == "rkl":
        return kl(lq, lp)
    if kind == "jsd":  # w = beta
        lm = log_mixture(lp, lq, w)
        return w * kl(lp, lm) + (1 - w) * kl(lq, lm)
    if kind == "skl":  # w = alpha
        return kl(lp, log_mixture(lp, lq, w))
    return kl(lq, log_mixture(lq, lp, w))  # srkl


def _logit_grad(kind: str, lq: Tensor, lp: Tensor, w: float, value: Tensor) -> Tensor:
    """d value / d (student logits / T) in closed form: ``q * (g - <q, g>)`` with ``g = d value / d q``."""
    q = lq.exp()
    if kind == "fkl":
        return q - lp.exp()
    if kind == "rkl":
        return q * (lq - lp - value.unsqueeze(-1))
    if kind == "jsd":  # g = (1 - beta) log(q / m); its <q, g> is (1 - beta) KL(q || m)
        lm = log_mixture(lp, lq, w)
        r = lq - lm
        return (1 - w) * q * (r - (q * r).sum(-1, keepdim=True))
    if kind == "skl":  # g = -(1 - alpha) p / m
        r = (lp - log_mixture(lp, lq, w)).exp()
        return -(1 - w) * q * (r - (q * r).sum(-1, keepdim=True))
    lm = log_mixture(lq, lp, w)  # srkl: g = log(q / m) + 1 - alpha q / m
    r = lq - lm - w * (lq - lm).exp()
    return q * (r - (q * r).sum(-1, keepdim=True))


class _StudentDivergence(torch.autograd.Function):
    """A divergence whose teacher side is fixed, with the gradient w.r.t. the student logits in
    closed form: the loss keeps two ``[N, V]`` tensors for backward instead of autograd's many."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, lp: Tensor, kind: str, w: float, temperature: float) -> Tensor:  # noqa: ANN001
        lq = log_probs(student_logits, temperature)
        value = _value(kind, lq, lp, w, _kl_finite)
        ctx.save_for_backward(lq, lp, value)
        ctx.kind, ctx.w, ctx.temperature, ctx.dtype = kind, w, temperature, student_logits.dtype
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        lq, lp, value = ctx.saved_tensors
        g = _logit_grad(ctx.kind, lq, lp, ctx.w, value) * (grad.unsqueeze(-1) / ctx.temperature)
        return g.to(ctx.dtype), None, None, None, None


def _fixed_teacher(kind: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float, w: float) -> Tensor:
    """``kind`` between student and teacher logits; closed-form student gradient unless the teacher
    itself needs one (then plain autograd through :func:`_value`)."""
    lp = log_probs(teacher_logits, temperature)
    if teacher_logits.requires_grad:
        return _value(kind, log_probs(student_logits, temperature), lp, w)
    return _StudentDivergence.apply(student_logits, lp, kind, w, temperature)


def fkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL(p || q) (word-level KD)."""
    return _fixed_teacher("fkl", student_logits, teacher_logits, temperature, 0.0)


forward_kl = fkl  # KL(p_teacher || q_student) at temperature 1 (an instruction loss, the switch gate)


def rkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL(q || p) (MiniLLM-style mode seeking)."""
    return _fixed_teacher("rkl", student_logits, teacher_logits, temperature, 0.0)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalized JSD as in TRL's ``generalized_jsd_loss`` (GKD, Agarwal et al. 2024).

    m = beta * p + (1 - beta) * q; value = beta * KL(p || m) + (1 - beta) * KL(q || m).
    beta = 0 gives forward KL(p || q), beta = 1 reverse KL(q || p) (TRL's convention).
    """
    if beta == 0.0:
        return fkl(student_logits, teacher_logits, temperature=temperature)
    if beta == 1.0:
        return rkl(student_logits, teacher_logits, temperature=temperature)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {beta}")
    return _fixed_teacher("jsd", student_logits, teacher_logits, temperature, beta)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance 0.5 * sum |p - q|."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def skl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew KL: KL(p || alpha * p + (1 - alpha) * q)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {alpha}")
    return _fixed_teacher("skl", student_logits, teacher_logits, temperature, alpha)


def srkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) * p + alpha * q)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {alpha}")
    return _fixed_teacher("srkl", student_logits, teacher_logits, temperature, alpha)


def topk_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, k: int = 50) -> Tensor:
    """Forward KL over the teacher's top-k tokens plus one tail bucket.

    Both distributions are collapsed onto k + 1 outcomes: the teacher's top-k ids
    and "any other token" (mass 1 - sum of the top-k).  Exact when k = V, always
    >= 0, and computable from a cache of the teacher's top-k log-probabilities.
    """
    k = min(int(k), teacher_logits.shape[-1])
    lp, lq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    top_lp, ids = lp.topk(k, dim=-1)
    top_lq = lq.gather(-1, ids)
    return kl_from_log_probs(_with_tail(top_lp), _with_tail(top_lq))


def topk_kl_renorm(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0,
                   k: int = 1024) -> Tensor:
    """BiLD's ``top_kl_loss``: forward KL between the teacher's and the student's softmax over the
    teacher's top-k logits only, each renormalised over those k (no tail bucket; no T^2 factor, as in
    the official code); ``[..., V] -> [...]``.  Differs from :func:`topk_kl`, which keeps the mass
    outside the top-k as one more outcome."""
    k = min(int(k), teacher_logits.shape[-1])
    top_t, ids = teacher_logits.detach().topk(k, dim=-1)
    top_s = student_logits.gather(-1, ids)
    return kl_from_log_probs(log_probs(top_t, temperature), log_probs(top_s, temperature))


def _with_tail(top_log_probs: Tensor) -> Tensor:
    """Append log(1 - sum exp(top)) as one more outcome; ``[..., k] -> [..., k + 1]``."""
    tail = (1.0 - top_log_probs.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
    return torch.cat([top_log_probs, tail.log()], dim=-1)


def _logit_difference_kl(lead: Tensor, follow: Tensor, k: int, temperature: float, teacher_leads: bool) -> Tensor:
    """One direction of BiLD: pairwise logit differences of the leader's top-k; ``[..., V] -> [...]``."""
    top_lead, ids = lead.topk(k, dim=-1)  # sorted, leader's rank order
    top_follow = follow.gather(-1, ids)
    i, j = torch.triu_indices(k, k, offset=1, device=lead.device)
    d_lead = (top_lead[..., i] - top_lead[..., j]) / temperature
    d_follow = (top_follow[..., i] - top_follow[..., j]) / temperature
    d_t, d_s = (d_lead, d_follow) if teacher_leads else (d_follow, d_lead)
    return kl_from_log_probs(torch.log_softmax(d_t, -1), torch.log_softmax(d_s, -1))


def bild(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0, k: int = 8) -> Tensor:
    """BiLD (Li et al., COLING 2025): teacher-led plus student-led logit-difference KL.

    For each side, the leader's top-k ids are chosen, the other model's logits are
    read at those ids, all k(k-1)/2 differences (i < j in the leader's rank order)
    are divided by the temperature, softmaxed, and KL(teacher || student) taken.
    As in the official code, the teacher's selection carries no gradient.
    """
    k = int(k)
    if k < 3:
        raise ValueError(f"bild needs k >= 3 (k={k} gives at most one logit difference)")
    k = min(k, student_logits.shape[-1])
    s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    t = (teacher_logits.float() if teacher_logits.dtype in (torch.float16, torch.bfloat16) else teacher_logits).detach()
    s, t = s.clamp(min=_NEG), t.clamp(min=_NEG)
    t_ld = _logit_difference_kl(t, s, k, temperature, teacher_leads=True)
    s_ld = _logit_difference_kl(s, t, k, temperature, teacher_leads=False)
    return t_ld + s_ld


def ce(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor] = None,
    *,
    labels: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Cross-entropy -log q(label) to the dataset token; 0 where ``labels == -100``.

    ``labels`` has shape ``logits.shape[:-1]``; the teacher is ignored.
    """
    lq = log_probs(student_logits, temperature)
    safe = labels.clamp(min=0).unsqueeze(-1)
    nll = -lq.gather(-1, safe).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(nll), nll)


cross_entropy = ce  # the (1 - kd_ratio) term of every objective


@dataclass
class TopK:
    """A teacher distribution held sparsely (the teacher cache): its k largest log-probabilities
    ``logp [N, k]`` (descending) and their ids ``ids [N, k]``; the remaining mass is spread evenly
    over the other ``vocab - k`` tokens.  Slicing selects rows; :meth:`dense` gives ``[N, vocab]``."""

    logp: Tensor
    ids: Tensor
    vocab: int

    def __getitem__(self, rows: slice) -> "TopK":
        return TopK(self.logp[rows], self.ids[rows], self.vocab)

    def to(self, device: Union[str, torch.device]) -> "TopK":
        return TopK(self.logp.to(device), self.ids.to(device), self.vocab)

    @property
    def k(self) -> int:
        return self.logp.shape[-1]

    def dense(self) -> Tensor:
        """Full log-probabilities ``[N, vocab]``: the top-k kept, the rest of the mass spread evenly."""
        if self.k >= self.vocab:
            return self.logp.new_full((self.logp.shape[0], self.vocab), float("-inf")).scatter(-1, self.ids, self.logp)
        tail = (1.0 - self.logp.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
        out = (tail.log() - math.log(self.vocab - self.k)).expand(-1, self.vocab).clone()
        return out.scatter(-1, self.ids, self.logp)


def _student_top(student_logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s [N, V] clamped, log q at ids [N, k], log-normaliser [N])`` without a ``[N, V]`` log-softmax."""
    s = (student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits)
    s = s.clamp(min=_NEG)
    lse = torch.logsumexp(s, -1)
    return s, s.gather(-1, ids) - lse.unsqueeze(-1), lse


def fkl_topk(student_logits: Tensor, teacher: TopK) -> Tensor:
    """:func:`fkl` against ``teacher.dense()``, computed from the k cached entries; ``[N, V] -> [N]``.

    KL = sum_top p (log p - log q) + m log(m / r) - (m / r) * sum_rest log q, with tail mass m spread
    over the r = V - k other tokens and sum_rest log q = sum_all s - V * lse - sum_top log q.
    """
    s, lq_top, lse = _student_top(student_logits, teacher.ids)
    p_top = teacher.logp.exp()
    keep = p_top > 0
    out = (p_top * (torch.where(keep, teacher.logp, 0.0) - torch.where(keep, lq_top, 0.0))).sum(-1)
    rest = teacher.vocab - teacher.k
    if rest > 0:
        tail = (1.0 - p_top.sum(-1)).clamp(min=1e-30)
        lq_rest = s.sum(-1) - teacher.vocab * lse - lq_top.sum(-1)
        out = out + tail * (tail.log() - math.log(rest)) - tail / rest * lq_rest
    return out


def topk_kl_topk(student_logits: Tensor, teacher: TopK, *, k: int = 50) -> Tensor:
    """:func:`topk_kl` from the cached entries (needs ``k <= teacher.k``); ``[N, V] -> [N]``."""
    k = min(int(k), teacher.vocab)
    _, lq_top, _ = _student_top(student_logits, teacher.ids[..., :k])
    return kl_from_log_probs(_with_tail(teacher.logp[..., :k]), _with_tail(lq_top))


@dataclass
class TopKTail(TopK):
    """A teacher distribution known by its k largest log-probabilities only (a teacher on a vLLM server:
    ``prompt_logprobs``), read as k + 1 outcomes: the k tokens ``ids [N, k]`` with ``logp [N, k]`` and one
    tail bucket holding the rest of the mass, as TRL's and ms-swift's server distillation read it.  The
    student is read the same way (its log-probabilities at ``ids`` and its own mass on every other token).
    ``token_logp [N]``: the teacher's log-probability of each response token (vLLM returns it beside the
    top k), or None."""

    token_logp: Optional[Tensor] = None

    def __getitem__(self, rows: slice) -> "TopKTail":
        sel = self.token_logp[rows] if self.token_logp is not None else None
        return TopKTail(self.logp[rows], self.ids[rows], self.vocab, sel)

    def to(self, device: Union[str, torch.device]) -> "TopKTail":
        sel = self.token_logp.to(device) if self.token_logp is not None else None
        return TopKTail(self.logp.to(device), self.ids.to(device), self.vocab, sel)

    def dense(self) -> Tensor:
        raise ValueError("a served teacher's top-k distribution has no dense form; use a divergence of SERVED")


def with_tail(student_logits: Tensor, teacher: TopKTail) -> tuple[Tensor, Tensor]:
    """Student and teacher as k + 1 outcomes (the teacher's top k, then the tail bucket):
    ``student_logits [N, V]`` -> ``(log q [N, k + 1], log p [N, k + 1])``; the student's tail is the
    log-sum-exp of its other logits, so its gradient reaches every token."""
    s = (student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits)
    s = s.clamp(min=_NEG)
    lse = torch.logsumexp(s, -1, keepdim=True)
    ids = teacher.ids.long()
    lq_top = s.gather(-1, ids) - lse
    lq_tail = torch.logsumexp(s.scatter(-1, ids, _NEG), -1, keepdim=True) - lse
    lp = teacher.logp.to(s.dtype)
    return torch.cat([lq_top, lq_tail], -1), _with_tail(lp)


def served_divergence(name: str, student_logits: Tensor, teacher: TopKTail, **params: float) -> Tensor:
    """``name`` against a served teacher's top k (how: :data:`SERVED`); ``[N, V] -> [N]``."""
    how = SERVED.get(name)
    if how == "bucket":  # the divergence over the k + 1 outcomes (its functions read log-probabilities as logits)
        lq, lp = with_tail(student_logits, teacher)
        return DIVERGENCES[name](lq, lp, **params)
    if name == "topk_kl":
        return topk_kl_topk(student_logits, teacher, k=int(params.get("k", 50)))
    if name == "topk_kl_renorm":  # BiLD's renormalised top k: the teacher's k largest are known exactly
        k = min(int(params.get("k", 50)), teacher.k)
        ids = teacher.ids[:, :k].long()
        temperature = params.get("temperature", 3.0)
        return topk_kl_renorm(student_logits.gather(-1, ids), teacher.logp[:, :k], temperature=temperature, k=k)
    raise ValueError(f"divergence {name!r} is not defined on a served teacher's top-k log-probabilities; "
                     f"choose one of {sorted(n for n in SERVED if n != 'ce')}")


DIVERGENCES: Dict[str, Callable[..., Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skl,
    "srkl": srkl,
    "topk_kl": topk_kl,
    "topk_kl_renorm": topk_kl_renorm,
    "bild": bild,
    "ce": ce,
}

#: the divergences SWITCH's gate may compare with tau_t (:class:`switchkd.rules.Gate`):
#: ``gate(student_logits [..., V], teacher_logits [..., V]) -> [...]``
GATES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "jsd": lambda s, t: jsd(s, t, beta=0.5),  # symmetric Jensen-Shannon, natural log
    "fkl": fkl,
    "rkl": rkl,
    "tvd": tvd,
    # speculative decoding's greedy acceptance: 1 where the two argmaxes differ (with tau 0.5, const)
    "argmax": lambda s, t: (s.argmax(-1) != t.argmax(-1)).to(s.dtype),
}
#: the gate SWITCH compares by default (the paper's)
DEFAULT_GATE = "jsd"
#: the largest value a gate can take, in nats, where it is bounded in a way a calibrated tau0 may exceed
#: (the Jensen-Shannon divergence with beta 1/2: ln 2)
GATE_MAXIMA: Dict[str, float] = {"jsd": math.log(2)}


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Optional[Union[Tensor, TopK]],
    labels: Optional[Tensor] = None,
    **params: float,
) -> Tensor:
    """Look up ``name`` in the registry and evaluate it; ``[..., V] -> [...]`` (a cached :class:`TopK`
    teacher is evaluated sparsely for fkl and topk_kl, else rebuilt)."""
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    if isinstance(teacher_logits, TopKTail) and name != "ce":  # a served teacher: its top k + a tail bucket
        return served_divergence(name, student_logits, teacher_logits, **params)
    if isinstance(teacher_logits, TopK):  # a cached teacher: sparse where exact, else rebuilt
        if params.get("temperature", 1.0) == 1.0 and name == "fkl":
            return fkl_topk(student_logits, teacher_logits)
        if params.get("temperature", 1.0) == 1.0 and name == "topk_kl" and int(params.get("k", 50)) <= teacher_logits.k:
            return topk_kl_topk(student_logits, teacher_logits, k=int(params.get("k", 50)))
        teacher_logits = teacher_logits.dense()
    if name == "ce":
        return fn(student_logits, teacher_logits, labels=labels, **params)
    return fn(student_logits, teacher_logits, **params)
