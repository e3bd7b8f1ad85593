"""Distillation across vocabularies: the teacher's view of a batch, and the ULD / GOLD losses.

When the teacher's tokenizer differs from the student's, the teacher reads the same text in its own
tokens: its own rendering of the prompt (its chat template) and the response re-tokenized from the
student's response bytes (:class:`CrossView`).  The two response tokenizations are aligned by bytes
(:mod:`switchkd.align`); on each side the distributions of a group's tokens are merged into one by the
chain rule (:func:`merge`: ``bayesian``, the last position's distribution times the probabilities of
the group's earlier tokens; ``observed``, the first position's times the later tokens'), and a loss
compares the merged distributions group by group:

- ``uld`` (Boizard et al. 2024, "Towards cross-tokenizer distillation: the Universal Logit Distillation
  loss"): the L1 distance between the two distributions sorted in decreasing order (the shorter vocabulary
  padded with zeros) — TRL GOLD's ``use_uld_loss``;
- ``gold`` (TRL GOLD's ``uld_use_hybrid_loss``): over the tokens both vocabularies hold as the same string,
  the generalized JSD (``beta``) of those probabilities; over the rest, the sorted L1; weighted by the share
  of the teacher's vocabulary that matches (or fixed weights).

Each is a pure function ``(student [G, V_s], teacher [G, V_t]) -> [G]`` over aligned groups; the per-token
loss of the trainer spreads a group's loss evenly over its student tokens, so the objective stays a sum
over response tokens divided by their number (TRL averages per sequence).  Checked against TRL's
``ULDLoss`` in ``tests/test_cross_tokenizer.py`` (values and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from switchkd.align import Alignment, Unspellable, Vocab, batch_alignment, token_bytes

EPS = 1e-8  # TRL's clamp on the probabilities of merged tokens and on the JSD's log-probabilities


def merge(probs: Tensor, group: Tensor, token_ids: Tensor, n_groups: int, strategy: str = "bayesian") -> Tensor:
    """One distribution per group ``[n_groups, V]`` from per-token distributions ``probs [N, V]`` (``group
    [N]`` non-decreasing group ids, ``token_ids [N]`` the tokens that were there).  Groups without tokens
    come out all zero."""
    n = probs.shape[0]
    pos = torch.arange(n, device=probs.device)
    first = torch.full((n_groups,), n, device=probs.device).scatter_reduce(0, group, pos, "amin")
    last = torch.full((n_groups,), -1, device=probs.device).scatter_reduce(0, group, pos, "amax")
    base = last if strategy == "bayesian" else first
    present = last >= 0
    base = torch.where(present, base, torch.zeros_like(base))
    p_tok = probs.gather(-1, token_ids[:, None]).squeeze(-1).clamp_min(EPS)
    scalar = pos != base[group]  # every token of a group but its base position multiplies in its probability
    log_prod = torch.zeros(n_groups, dtype=probs.dtype, device=probs.device).index_add(
        0, group, torch.where(scalar, p_tok.log(), torch.zeros_like(p_tok)))
    return probs[base] * log_prod.exp()[:, None] * present[:, None].to(probs.dtype)


def _sorted_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-row L1 distance of the two rows sorted in decreasing order, the shorter padded with zeros, ``[G]``."""
    s, t = student.sort(-1, descending=True).values, teacher.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def uld(student: Tensor, teacher: Tensor, **_: Any) -> Tensor:
    """ULD per aligned group ``[G]`` from merged probabilities ``student [G, V_s]``, ``teacher [G, V_t]``."""
    return _sorted_l1(student, teacher)


def _jsd_of_probs(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Generalized JSD per row ``[G]`` of (unnormalised) probability rows, as TRL GOLD's ``generalized_jsd_loss``
    with ``logits_are_probs=True`` (log of the probabilities clamped at 1e-8)."""
    ls, lt = student.clamp_min(EPS).log(), teacher.clamp_min(EPS).log()
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
    mix = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    return (b * F.kl_div(mix, lt, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(mix, ls, reduction="none", log_target=True)).sum(-1)


def gold(student: Tensor, teacher: Tensor, *, student_matched: Tensor, teacher_matched: Tensor, beta: float = 0.5,
         matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None, **_: Any) -> Tensor:
    """GOLD's hybrid loss per aligned group ``[G]``: JSD over the tokens both vocabularies share by string
    (``student_matched [M]`` / ``teacher_matched [M]``: their ids, pairwise), sorted L1 over the rest;
    weights ``matched_weight``/``unmatched_weight`` or, unset, M / V_t and 1 - M / V_t."""
    s_mask = torch.zeros(student.shape[-1], dtype=torch.bool, device=student.device)
    t_mask = torch.zeros(teacher.shape[-1], dtype=torch.bool, device=teacher.device)
    s_mask[student_matched], t_mask[teacher_matched] = True, True
    zero = student.new_zeros(student.shape[0])
    matched = _jsd_of_probs(student[:, student_matched], teacher[:, teacher_matched], beta) if len(teacher_matched) \
        else zero
    unmatched = _sorted_l1(student[:, ~s_mask], teacher[:, ~t_mask]) if (~s_mask).any() and (~t_mask).any() else zero
    if matched_weight is None:
        matched_weight = len(teacher_matched) / max(1, teacher.shape[-1])
        unmatched_weight = 1.0 - matched_weight
    return matched_weight * matched + unmatched_weight * unmatched


LOSSES: Dict[str, Callable[..., Tensor]] = {"uld": uld, "gold": gold}


def shared_vocabulary(student_tok: Any, teacher_tok: Any) -> tuple[Tensor, Tensor]:
    """``(student ids, teacher ids)`` of the tokens both vocabularies hold as the same string, sorted by the
    teacher's id (TRL GOLD's vocabulary mapping)."""
    s_vocab = student_tok.get_vocab()
    pairs = sorted((t_id, s_vocab[s]) for s, t_id in teacher_tok.get_vocab().items() if s in s_vocab)
    pairs = [(t, s) for t, s in pairs if t < len(teacher_tok) and s < len(student_tok)]
    return (torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long))


@dataclass
class Aligned:
    """The teacher's side of a cross-vocabulary batch: its merged distributions per aligned group
    ``probs [n, V_t]`` (all groups, zero rows for those without teacher tokens) and the batch's
    :class:`~switchkd.align.Alignment`."""

    probs: Tensor
    alignment: Alignment

    def to(self, device: Any) -> "Aligned":
        return Aligned(self.probs.to(device), self.alignment.to(device))


class CrossView:
    """The teacher's reading of batches across vocabularies, and the loss between the two sides."""

    def __init__(self, student_tok: Any, teacher_tok: Any, loss: str = "gold", beta: float = 0.5,
                 merge_strategy: str = "bayesian", matched_weight: Optional[float] = None) -> None:
        self.s_tok, self.t_tok = student_tok, teacher_tok
        self.s_table, self.t_table = token_bytes(student_tok), token_bytes(teacher_tok)
        self.t_vocab = Vocab(teacher_tok, self.t_table)
        self.loss, self.beta, self.strategy, self.matched_weight = loss, beta, merge_strategy, matched_weight
        self.s_matched, self.t_matched = shared_vocabulary(student_tok, teacher_tok)
        self.teacher_vocab = len(teacher_tok)
        self.max_length: Optional[int] = None  # the teacher's positions (set by the trainer): longer rows are cut

    def teacher_response(self, response: Sequence[int]) -> List[int]:
        """A student response (ids) as teacher ids: the same bytes' text, re-tokenized, and the teacher's EOS
        where the student's ended with its EOS."""
        ends = len(response) > 0 and response[-1] == self.s_tok.eos_token_id
        data = b"".join(self.s_table[i] for i in response)
        try:
            ids = self.t_tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"] if data else []
        except UnicodeDecodeError:  # bytes that are not UTF-8 (a sampled partial character): spelled byte by byte
            try:
                ids = self.t_vocab.encode_bytes(data)
            except Unspellable:
                ids = self.t_tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return list(ids) + ([self.t_tok.eos_token_id] if ends else [])

    def apply(self, batch: Any) -> Any:
        """The batch with the teacher's tokens (``teacher_*`` from its own prompt and the re-tokenized
        responses) and the response alignment; the student's side is unchanged."""
        from switchkd.batch import left_pad, right_pad

        if batch.alignment is not None and batch.alignment.view is self:  # already built (a rollout's own view, or a
            return batch  # batch held across MiniLLM's PPO epochs): new responses come in a new Batch without one
        if batch.teacher_prompt_ids is None:
            raise ValueError("a cross-vocabulary batch needs the teacher's own prompts (tokenize with the teacher's "
                             "tokenizer)")
        s_resp = batch.responses()
        t_resp = [self.teacher_response(r) for r in s_resp]
        t_prompts = batch.teacher_prompts()
        room = [None if self.max_length is None else max(1, self.max_length - len(p)) for p in t_prompts]
        cut = [r is not None and len(t) > r for t, r in zip(t_resp, room)]
        t_resp = [t[:r] if c else t for t, r, c in zip(t_resp, room, cut)]
        pad = self.t_tok.pad_token_id
        dev = batch.device
        batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels = \
            (x.to(dev) for x in right_pad(t_prompts, t_resp, pad))
        batch.teacher_prompt_ids, batch.teacher_prompt_mask = (x.to(dev) for x in left_pad(t_prompts, pad))
        # the loss sees the tokens after the first of each row (shifted labels): align those
        s_rows = [r for r in _predicted(batch.labels)]
        t_rows = [r for r in _predicted(batch.teacher_labels)]
        batch.alignment = batch_alignment(s_rows, t_rows, self.s_table, self.t_table, cut).to(dev)
        batch.alignment.view = self
        return batch

    def targets(self, teacher_logits: Tensor, batch: Any) -> Aligned:
        """The teacher's merged distributions from its logits at its response tokens ``[N_t, V_t]``."""
        a = batch.alignment
        probs = torch.softmax(teacher_logits.float(), -1)
        y = batch.teacher_labels[:, 1:][batch.teacher_labels[:, 1:] != -100]
        return Aligned(merge(probs, a.teacher, y, a.n, self.strategy), a)

    def token_loss(self, student_logits: Tensor, target: Aligned, labels: Tensor) -> Tensor:
        """Per student response token ``[N_s]``: each paired group's loss spread evenly over its student tokens
        (0 for tokens of groups the teacher has no tokens in).  Both sides at temperature 1 (TRL's default)."""
        a = target.alignment
        s = merge(torch.softmax(student_logits.float(), -1), a.student, labels, a.n, self.strategy)
        keep = a.paired.nonzero().squeeze(-1)
        kw = dict(student_matched=self.s_matched.to(s.device), teacher_matched=self.t_matched.to(s.device),
                  beta=self.beta, matched_weight=self.matched_weight,
                  unmatched_weight=None if self.matched_weight is None else 1.0 - self.matched_weight)
        per_group = torch.zeros(a.n, dtype=s.dtype, device=s.device)
        per_group[keep] = LOSSES[self.loss](s[keep], target.probs[keep].to(s.dtype), **kw)
        count = torch.bincount(a.student, minlength=a.n).clamp_min(1)
        return (per_group / count)[a.student]


def same_vocabulary(student_tok: Any, teacher_tok: Any) -> bool:
    """Whether the two tokenizers map the same strings to the same ids."""
    return student_tok.get_vocab() == teacher_tok.get_vocab()


def view_for(cfg: Any, student_tok: Any, teacher_tok: Any, source_reason: Optional[str] = None) -> Optional[CrossView]:
    """The :class:`CrossView` a run needs when the teacher's vocabulary differs from the student's (None when
    they share one); one-line refusals when ``method.cross_tokenizer=off`` or the run cannot work across
    vocabularies (``source_reason``: why the run's source cannot, its ``needs(cfg).across_vocabularies``)."""
    from switchkd.sections import ConfigError

    if same_vocabulary(student_tok, teacher_tok):
        return None
    m = cfg.method
    names = (f"the teacher's tokenizer ({cfg.teacher.tokenizer or cfg.teacher.name}, {len(teacher_tok)} tokens) and "
             f"the student's ({cfg.model.tokenizer or cfg.model.name}, {len(student_tok)} tokens)")
    if m.cross_tokenizer == "off":
        raise ConfigError(f"{names} have different vocabularies and method.cross_tokenizer=off: token ids cannot be "
                          "compared; set method.cross_tokenizer=gold (or uld) to distil across vocabularies")
    why = (f"method.source={m.source}: {source_reason}" if source_reason else
           "method.teacher_cache (cached top-k ids are the teacher's)" if m.teacher_cache else
           "method.instruction_weight > 0 (the instruction loss compares same-vocabulary prompts)"
           if m.instruction_weight > 0 else
           "train.loss_chunk > 0 (the chunked head works on one vocabulary)" if cfg.train.loss_chunk else None)
    if why:
        raise ConfigError(f"{names} differ, and {why}; docs/methods.md lists the methods that distil across "
                          "vocabularies")
    return CrossView(student_tok, teacher_tok, "gold" if m.cross_tokenizer == "auto" else m.cross_tokenizer,
                     beta=m.cross_beta, merge_strategy=m.cross_merge)


def _predicted(labels: Tensor) -> List[List[int]]:
    """Each row's predicted response tokens (``labels[:, 1:]`` outside -100), as the loss selects them."""
    shifted = labels[:, 1:]
    return [row[row != -100].tolist() for row in shifted]
