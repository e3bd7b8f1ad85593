"""Interleaved decoding across vocabularies: SWITCH, SKD and MiniLLM's sampling when the teacher's tokenizer
differs.

Both models read the same text, each in its own tokens, and both KV caches stay at the same byte of it.
At each step the student's next-token distribution q [V_s] and the teacher's p [V_t] are compared by a
*cross gate* (``method.switch.cross_gate``):

- ``shared`` (default): both distributions restricted to the tokens the two vocabularies share by string
  (TRL GOLD's vocabulary mapping), renormalised, then ``method.switch.gate`` (JSD by default);
- ``byte``: each distribution summed into the distribution of the next *byte* of text (every token
  counted at its first byte; EOS and special tokens in one more bucket, 257 in all), then
  ``method.switch.gate``: both models predict the same event, but only its first byte.
- ``sorted``: half the L1 distance of the two distributions sorted in decreasing order (ULD's distance,
  Boizard et al. 2024; in [0, 1], blind to which tokens carry the mass).

Where the gate exceeds tau_t (t = the student's response position) the teacher writes one of its tokens
(sampled, or argmax when greedy), else the student writes one of its own.  The written bytes are
re-tokenized for the other model (:meth:`Vocab.encode`: the tokenizer's own encoding of the span, or its
single-byte tokens when a tokenizer would spell the span differently alone), and fed to its cache; a
token that ends inside a UTF-8 character keeps the same writer until the character is complete.  The
student's sequence (its own tokens and the re-tokenized teacher spans, flagged ``from_teacher``) is what
the student trains on; the loss reads the teacher's canonical tokenization of the whole response
(:class:`switchkd.cross.CrossView`).  SKD's rule across vocabularies: the student's token is kept when
the first teacher token of its bytes is among the teacher's top K.  MiniLLM's teacher-mixed sampling
(:class:`~switchkd.rules.Mixture`): each step the teacher writes with probability ``teacher_mix``, else the student (for one
vocabulary the same distribution as sampling a p + (1 - a) q token by token).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from switchkd.align import NO_BYTES, Unspellable, Vocab, partial_utf8
from switchkd.decoding import RolloutConfig, RolloutOutput, Stepper, chooser
from switchkd.distributed import all_ranks, is_sharded
from switchkd.divergences import GATES
from switchkd.rules import Rule

CROSS_GATES = ("byte", "shared", "sorted")


def _marginal(probs: Tensor, first: Tensor) -> Tensor:
    """``[B, 257]``: the next-byte distribution of next-token probabilities ``probs [B, V]``."""
    out = probs.new_zeros(probs.shape[0], NO_BYTES + 1)
    return out.index_add_(1, first[: probs.shape[1]].to(probs.device), probs)


def cross_gate(kind: str, gate: str, q_logits: Tensor, p_logits: Tensor, s: Vocab, t: Vocab,
               shared: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """The gate ``[B]`` between student logits ``q [B, V_s]`` and teacher logits ``p [B, V_t]`` (``kind`` one of
    :data:`CROSS_GATES`; ``gate`` the divergence of ``byte``/``shared``)."""
    q, p = torch.softmax(q_logits.double(), -1), torch.softmax(p_logits.double(), -1)
    if kind == "sorted":
        qs, ps = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
        w = max(qs.shape[-1], ps.shape[-1])
        qs, ps = (torch.nn.functional.pad(x, (0, w - x.shape[-1])) for x in (qs, ps))
        return 0.5 * (qs - ps).abs().sum(-1)
    if kind == "byte":
        q, p = _marginal(q, s.first), _marginal(p, t.first)
    elif kind == "shared":
        s_ids, t_ids = (x.to(q.device) for x in shared)
        q, p = q[:, s_ids], p[:, t_ids]
        q, p = q / q.sum(-1, keepdim=True).clamp_min(1e-300), p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        raise ValueError(f"cross gate must be one of {', '.join(CROSS_GATES)}, got {kind!r}")
    return GATES[gate](q.clamp_min(1e-300).log(), p.clamp_min(1e-300).log())


def _feed(stepper: Stepper, rows: List[List[int]], pad: int, synced: bool = False) -> None:
    """Feed each row its own new tokens (any number, 0 included) in one forward; the row's logits become
    those after its last new token (unchanged for rows fed nothing).  ``synced`` (sharded models: forwards
    are collective): a forward also when no row has a token (one masked column)."""
    counts = torch.tensor([len(r) for r in rows], device=stepper.next_pos.device)
    n = max(int(counts.max()), int(synced))
    if n == 0:
        return
    ids = torch.full((len(rows), n), pad, dtype=torch.long, device=counts.device)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    before = stepper.logits
    logits = stepper.feed(ids)
    stepper.keep(counts, n)
    last = logits[torch.arange(len(rows), device=counts.device), (counts - 1).clamp(min=0)]
    stepper.logits = torch.where((counts > 0)[:, None], last, before)


class _Row:
    """One row's decoding state."""

    def __init__(self) -> None:
        self.tokens: List[int] = []
        self.from_t: List[bool] = []
        self.gate: List[float] = []
        self.t_tokens: List[int] = []  # the teacher's tokens as fed (its spans' encodings)
        self.steps: List[Tuple[int, int, float, str]] = []  # per step: (student tokens, teacher tokens, gate, writer)
        self.pending, self.forced, self.done = b"", "", False


@torch.no_grad()
def cross_switch(student: Any, teacher: Any, s_ids: Tensor, s_mask: Tensor, t_ids: Tensor, t_mask: Tensor,
                 cfg: RolloutConfig, rule: Rule, s_vocab: Vocab, t_vocab: Vocab, kind: Optional[str] = None,
                 shared: Optional[Tuple[Tensor, Tensor]] = None, t_max_len: Optional[int] = None) -> RolloutOutput:
    """Two-writer rollouts across vocabularies (SWITCH's gate, SKD's rank, MiniLLM's mixture: ``rule``).

    Args:
        student, teacher: the models, each with its own vocabulary.
        s_ids, s_mask: the student's left-padded prompts ``[B, P]``.
        t_ids, t_mask: the teacher's own left-padded prompts ``[B, P_t]``.
        cfg: the sampling settings; at most ``cfg.max_new_tokens`` student tokens per row.
        rule: who writes; a gate compares the two distributions by the cross gate ``kind`` (:func:`cross_gate`), a
            rank test reads the first teacher token of the student's proposal, a mixture draws its writer.
        s_vocab, t_vocab: the two vocabularies' byte tables.
        kind: one of :data:`CROSS_GATES` in place of the gate's own ``cross``; shared: the tokens both vocabularies
            share (student ids, teacher ids; computed when a ``shared`` gate needs them).
        t_max_len: the teacher's side holds at most this many positions.

    Returns:
        The student's sequences ``[B, P + N]`` with ``response_mask``/``from_teacher``/``gate [B, N]``.
    """
    device, B, N = s_ids.device, s_ids.shape[0], cfg.max_new_tokens
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    choose = chooser(cfg, gen)
    vs, vt = len(s_vocab.table), len(t_vocab.table)
    s = Stepper(student, s_ids, s_mask, vs)
    tt = Stepper(teacher, t_ids, t_mask, vt)
    t_room = (t_max_len or 1 << 30) - t_ids.shape[1]

    def measure_for(divergence: str, cross: str) -> Any:
        nonlocal shared
        cross = kind or cross
        if cross == "shared" and shared is None:
            from switchkd.cross import shared_vocabulary

            shared = shared_vocabulary(s_vocab.tok, t_vocab.tok)
        return lambda q, p: cross_gate(cross, divergence, q, p, s_vocab, t_vocab, shared)

    rule = rule.across(measure_for)
    rows = [_Row() for _ in range(B)]
    synced = is_sharded(student) or is_sharded(teacher)  # FSDP2 / ZeRO-3: every rank steps until all are done
    t = 0
    while not (all_ranks(all(r.done for r in rows), device) if synced else all(r.done for r in rows)):
        pos = torch.tensor([len(r.tokens) for r in rows], device=device)
        s_tok, t_tok = choose(s.logits).tolist(), choose(tt.logits).tolist()
        proposal = (torch.tensor(_teacher_ids(s_tok, s_vocab, t_vocab), device=device) if rule.reads_proposal else
                    torch.tensor(s_tok, device=device))
        decision = rule.decide(s.logits, tt.logits, pos, proposal, gen)
        d, exceed = decision.gate.tolist(), decision.teacher_writes.tolist()
        s_new, t_new = [[] for _ in rows], [[] for _ in rows]
        for i, r in enumerate(rows):
            if r.done:
                continue
            writer = r.forced or ("teacher" if exceed[i] else "student")
            try:
                s_new[i], t_new[i] = _write(r, writer, s_tok[i] if writer == "student" else t_tok[i], s_vocab, t_vocab, N)
            except Unspellable:  # the other vocabulary cannot spell the token: the other model writes instead
                writer = "student" if writer == "teacher" else "teacher"
                try:
                    if r.forced:
                        raise
                    s_new[i], t_new[i] = _write(r, writer, s_tok[i] if writer == "student" else t_tok[i], s_vocab,
                                                t_vocab, N)
                except Unspellable:  # neither can continue the text the other holds: the row ends
                    r.done = True
                    continue
            r.gate += [float(d[i])] * len(s_new[i])
            if len(r.t_tokens) + len(t_new[i]) >= t_room:  # the teacher's positions are full: the row ends here
                r.done, t_new[i] = True, []
            r.t_tokens += t_new[i]
            r.steps.append((len(s_new[i]), len(t_new[i]), float(d[i]), writer))
        _feed(s, s_new, s_vocab.eos if s_vocab.eos >= 0 else 0, synced)
        _feed(tt, t_new, t_vocab.eos if t_vocab.eos >= 0 else 0, synced)
        t += 1
        if t > 4 * N + 16:  # a safety stop for writers of zero-byte tokens (each step ends a row or writes a token)
            for r in rows:
                r.done = True
    out = _output(rows, s_ids, N, s_vocab, device, {"student": s.forwards, "teacher": tt.forwards})
    out.trace = [(r.t_tokens, r.steps) for r in rows]  # type: ignore[attr-defined]  (for checks by recomputation)
    return out


def _write(r: _Row, writer: str, token: int, s: Vocab, t: Vocab, N: int) -> Tuple[List[int], List[int]]:
    """Apply one written token to the row; returns the new (student, teacher) tokens to feed."""
    mine, other = (s, t) if writer == "student" else (t, s)
    if token == mine.eos:
        r.done = True
        s_new = [s.eos] if s.eos >= 0 else []
        return _keep(r, s_new, writer, N), []
    data = r.pending + mine.table[token]
    if partial_utf8(data) and len(data) < 4:
        r.pending, r.forced = data, writer
        other_new: List[int] = []
    else:
        other_new = other.encode(data) if data else []  # (raises Unspellable before the row changes)
        r.pending, r.forced = b"", ""
    s_new, t_new = ([token], other_new) if writer == "student" else (other_new, [token])
    return _keep(r, s_new, writer, N), t_new


def _keep(r: _Row, s_new: List[int], writer: str, N: int) -> List[int]:
    """Append the student's new tokens (at most N in all; the row ends at N)."""
    s_new = s_new[: N - len(r.tokens)]
    r.tokens += s_new
    r.from_t += [writer == "teacher"] * len(s_new)
    if len(r.tokens) >= N:
        r.done = True
    return s_new


def _teacher_ids(s_tok: List[int], s: Vocab, t: Vocab) -> List[int]:
    """The first teacher token of each student token's bytes, as SKD ranks a proposal across vocabularies (EOS: the
    teacher's EOS; a partial UTF-8 character: its first byte's single-byte token; -1: the teacher cannot spell it)."""
    ids: List[int] = []
    for x in s_tok:
        if x == s.eos:
            ids.append(t.eos)
            continue
        data = s.table[x]
        try:
            spelled = [t.byte_id.get(data[0], -1)] if partial_utf8(data) else t.encode(data) if data else []
        except Unspellable:
            spelled = []
        ids.append(spelled[0] if spelled else -1)
    return ids


def _output(rows: List[_Row], s_ids: Tensor, N: int, s: Vocab, device: Any, forwards: Dict[str, int]) -> RolloutOutput:
    B = len(rows)
    pad = s.eos if s.eos >= 0 else 0
    tokens = torch.full((B, N), pad, dtype=torch.long)
    resp = torch.zeros((B, N), dtype=torch.bool)
    from_t = torch.zeros_like(resp)
    gate = torch.full((B, N), float("nan"))
    for i, r in enumerate(rows):
        n = len(r.tokens)
        if n:
            tokens[i, :n] = torch.tensor(r.tokens)
            resp[i, :n] = True
            from_t[i, :n] = torch.tensor(r.from_t)
            gate[i, :n] = torch.tensor(r.gate)
    return RolloutOutput(torch.cat([s_ids, tokens.to(device)], 1), resp.to(device), from_t.to(device),
                         gate.to(device), None, forwards)

