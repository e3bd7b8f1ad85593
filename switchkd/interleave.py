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
from switchkd.decoding import Record, RolloutConfig, RolloutOutput, Stepper, chooser, finished, make_generator
from switchkd.distributed import is_sharded
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
    device, budget = s_ids.device, cfg.max_new_tokens
    generator = make_generator(cfg, device)
    choose = chooser(cfg, generator)
    student_stepper = Stepper(student, s_ids, s_mask, len(s_vocab.table))
    teacher_stepper = Stepper(teacher, t_ids, t_mask, len(t_vocab.table))
    teacher_room = (t_max_len or 1 << 30) - t_ids.shape[1]

    def measure_for(divergence: str, cross: str) -> Any:
        nonlocal shared
        cross = kind or cross
        if cross == "shared" and shared is None:
            from switchkd.cross import shared_vocabulary

            shared = shared_vocabulary(s_vocab.tok, t_vocab.tok)
        return lambda q, p: cross_gate(cross, divergence, q, p, s_vocab, t_vocab, shared)

    rule = rule.across(measure_for)
    rows = [_Row() for _ in range(s_ids.shape[0])]
    synced = is_sharded(student) or is_sharded(teacher)  # FSDP2 / ZeRO-3: every rank steps until all are done
    step = 0
    while not finished(all(row.done for row in rows), synced, device):
        positions = torch.tensor([len(row.tokens) for row in rows], device=device)
        student_tokens = choose(student_stepper.logits).tolist()
        teacher_tokens = choose(teacher_stepper.logits).tolist()
        proposal = torch.tensor(_teacher_ids(student_tokens, s_vocab, t_vocab) if rule.reads_proposal
                                else student_tokens, device=device)
        decision = rule.decide(student_stepper.logits, teacher_stepper.logits, positions, proposal, generator)
        student_new, teacher_new = _apply(rows, decision, student_tokens, teacher_tokens, s_vocab, t_vocab, budget,
                                          teacher_room)
        _feed(student_stepper, student_new, s_vocab.eos if s_vocab.eos >= 0 else 0, synced)
        _feed(teacher_stepper, teacher_new, t_vocab.eos if t_vocab.eos >= 0 else 0, synced)
        step += 1
        if step > 4 * budget + 16:  # a safety stop for writers of zero-byte tokens (each step ends a row or writes)
            for row in rows:
                row.done = True
    out = _output(rows, s_ids, budget, s_vocab, {"student": student_stepper.forwards, "teacher": teacher_stepper.forwards})
    out.trace = [(row.t_tokens, row.steps) for row in rows]  # type: ignore[attr-defined]  (for checks by recomputation)
    return out


def _apply(rows: List[_Row], decision: Any, student_tokens: List[int], teacher_tokens: List[int], s_vocab: Vocab,
           t_vocab: Vocab, budget: int, teacher_room: int) -> Tuple[List[List[int]], List[List[int]]]:
    """Write each live row's decided token (the teacher's where ``decision.teacher_writes``, else the student's; a
    token the other vocabulary cannot spell is written by the other model).  Returns the new tokens each model is
    fed, per row."""
    gates, teacher_writes = decision.gate.tolist(), decision.teacher_writes.tolist()
    student_new: List[List[int]] = [[] for _ in rows]
    teacher_new: List[List[int]] = [[] for _ in rows]
    for i, row in enumerate(rows):
        if row.done:
            continue
        writer = row.forced or ("teacher" if teacher_writes[i] else "student")
        try:
            student_new[i], teacher_new[i] = _write(row, writer, student_tokens[i] if writer == "student"
                                                    else teacher_tokens[i], s_vocab, t_vocab, budget)
        except Unspellable:  # the other vocabulary cannot spell the token: the other model writes instead
            writer = "student" if writer == "teacher" else "teacher"
            try:
                if row.forced:
                    raise
                student_new[i], teacher_new[i] = _write(row, writer, student_tokens[i] if writer == "student"
                                                        else teacher_tokens[i], s_vocab, t_vocab, budget)
            except Unspellable:  # neither can continue the text the other holds: the row ends
                row.done = True
                continue
        row.gate += [float(gates[i])] * len(student_new[i])
        if len(row.t_tokens) + len(teacher_new[i]) >= teacher_room:  # the teacher's positions are full: the row ends
            row.done, teacher_new[i] = True, []
        row.t_tokens += teacher_new[i]
        row.steps.append((len(student_new[i]), len(teacher_new[i]), float(gates[i]), writer))
    return student_new, teacher_new


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


def _output(rows: List[_Row], s_ids: Tensor, budget: int, s_vocab: Vocab, forwards: Dict[str, int]) -> RolloutOutput:
    """The rows' student tokens as the engine's :class:`~switchkd.decoding.Record` output ``[B, P + N]``."""
    device, longest = s_ids.device, max([len(row.tokens) for row in rows] + [1])
    record = Record(len(rows), budget, 0, s_vocab.eos if s_vocab.eos >= 0 else 0, device, keep_logits=False)
    columns = torch.full((len(rows), longest), budget, dtype=torch.long)
    tokens = torch.zeros_like(columns)
    from_teacher = torch.zeros(columns.shape, dtype=torch.bool)
    gate = torch.full(columns.shape, float("nan"))
    for i, row in enumerate(rows):
        n = len(row.tokens)
        if n:
            columns[i, :n], tokens[i, :n] = torch.arange(n), torch.tensor(row.tokens)
            from_teacher[i, :n], gate[i, :n] = torch.tensor(row.from_t), torch.tensor(row.gate)
    record.write(columns.to(device), tokens.to(device), from_teacher.to(device), gate.to(device))
    return record.output(s_ids, forwards)
