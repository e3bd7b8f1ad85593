"""Two-writer rollouts whose student tokens are drafted by a vLLM engine (``method.decoding.engine: vllm`` with
SWITCH, SKD and MiniLLM's teacher-mixed sampling).

Each block, vLLM samples up to k tokens per row after the row's prefix (the prompt and the tokens decided so far;
:class:`switchkd.vllm_engine.VLLMStudent` holds the student's current weights).  The in-process student and the
teacher then score the whole block in one forward each, from their own KV caches (:class:`switchkd.decoding.Stepper`,
with the rejected columns masked as holes, as in :mod:`switchkd.speculative`), and the rule decides per row:

- a verifiable rule (SWITCH's gate, SKD's rank; :meth:`switchkd.rules.Rule.decide`) at every drafted position;
  the drafts before the first position where the teacher writes are kept, the teacher writes there
  (:func:`switchkd.speculative.decide`).  A draft is a sample of the student's distribution at its prefix, so the
  decisions and the teacher's tokens are the in-process engines' on the same drafts;
- a mixture (MiniLLM, :class:`switchkd.rules.Mixture`): at every position the teacher writes with probability ``teacher_mix`` (a draw independent
  of the models), else the student's draft stands, so every token is a sample of ``a p + (1 - a) q`` (with
  temperature 1 and no top-k/top-p, which the MiniLLM source requires for this loop).  The student's
  log-probability of every token is recorded (MiniLLM's ``q_old``).

With the teacher on a vLLM server (:class:`switchkd.served.ServedTeacher`), its distribution at each drafted position
comes from one sampled step after the row's prefix and the drafts before it
(:meth:`~switchkd.served.ServedTeacher.next_tokens`: its top ``teacher.top_k`` raw log-probabilities and a tail
bucket; short requests that reuse vLLM's prefix cache, where ``prompt_logprobs`` over the whole sequence would
recompute it); the gate compares the two models over those k + 1 outcomes (:func:`switchkd.divergences.with_tail`)
and SKD's rank is exact while its K is at most ``teacher.top_k``.  The teacher's token where it writes is the token
that same step sampled with the run's settings (greedy: its top-1).  The served gate approximates the exact one:
docs/benchmarks.md measures how often they agree on the real pair.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import Tensor

from switchkd.decoding import Record, RolloutConfig, RolloutOutput, Stepper, setup, teacher_prompts
from switchkd.rules import Rule
from switchkd.speculative import cost_ratio, decide, next_k, verify


def _rows(ids: Tensor, mask: Tensor) -> List[List[int]]:
    """Each row's unpadded tokens."""
    return [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]


@torch.no_grad()
def drafted_rollout(drafter: Any, student: Any, teacher: Any, input_ids: Tensor, attention_mask: Tensor,
                    cfg: RolloutConfig, rule: Rule, teacher_input_ids: Optional[Tensor] = None,
                    teacher_attention_mask: Optional[Tensor] = None) -> RolloutOutput:
    """SWITCH / SKD (a verifiable rule) or MiniLLM's mixed sampling (a mixture) with vLLM drafts.

    Args:
        drafter: an object with ``sample(prompts, max_new_tokens, decoding, eos_token_id, seed, greedy)`` returning
            each prompt's sampled continuation (a list of token ids, EOS kept): the student's vLLM engine.
        student: the in-process student (eval mode), scoring each drafted block.
        teacher: the in-process teacher, or a served one (``teacher.served``).
        input_ids, attention_mask: left-padded prompts ``[B, P]``.
        cfg: the sampling and engine settings.
        rule: who writes (:mod:`switchkd.rules`): verifiable (SWITCH, SKD) or a mixture (MiniLLM).
        teacher_input_ids, teacher_attention_mask: the teacher's own left-padded prompts ``[B, P']`` (priming).

    Returns:
        The :class:`~switchkd.decoding.RolloutOutput` of the in-process engines: ``sequences [B, P + N]``,
        ``response_mask``/``from_teacher``/``gate`` ``[B, N]``, ``teacher_logits [B, N, V]`` when kept (in-process
        teacher), ``logprobs [B, N]`` for ``mixed``.
    """
    if not (rule.verifiable or rule.samples_mixture):
        raise ValueError(f"drafted rollouts decide a verifiable rule or a mixture, got {type(rule).__name__}")
    device, served = input_ids.device, bool(getattr(teacher, "served", False))
    vocab, eos_ids, pad, choose = setup(student, cfg, device)
    t_ids, t_mask = teacher_prompts(input_ids, attention_mask, teacher_input_ids, teacher_attention_mask)
    student_stepper = Stepper(student, input_ids, attention_mask, vocab)
    teacher_stepper = None if served else Stepper(teacher, t_ids, t_mask, vocab)
    prefixes, teacher_prefixes = _rows(input_ids, attention_mask), _rows(t_ids, t_mask)
    B, N = input_ids.shape[0], cfg.max_new_tokens
    mixed = rule.samples_mixture
    record = Record(B, N, vocab, pad, device, cfg.keep_teacher_logits and not served, keep_logprobs=mixed)
    generator = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2 ** 62, ())))
    decided = torch.zeros(B, dtype=torch.long, device=device)
    draft_len = max(1, cfg.draft_k)
    cost = 1.0 + (cfg.teacher_cost if cfg.teacher_cost is not None
                  else (1.0 if served else cost_ratio(teacher, student)))
    pending: Optional[Tensor] = None  # each row's last decided token, not yet fed to either model
    rejected, examined = 0.0, 0.0
    forwards = {"student": 0, "teacher": 0, "drafts": 0}
    while True:
        active = ~record.done & (decided < N)
        if not bool(active.any()):
            break
        block = min(draft_len, N - int(decided[active].min()))
        drafts = _draft(drafter, prefixes, active, block, cfg, pad, generator, device)  # [B, block]
        forwards["drafts"] += 1
        q = verify(student_stepper, pending, drafts)  # [B, block, V]
        positions = decided[:, None] + torch.arange(block, device=device)
        teacher_logits, served_tokens = None, None
        if mixed:
            decision = rule.decide(q, None, positions, drafts, generator)
            gate, exceed = decision.gate, decision.teacher_writes
            if not served:
                teacher_logits = verify(teacher_stepper, pending, drafts)
        elif served:
            seed = int(torch.randint(2 ** 30, (), generator=generator))
            gate, exceed, served_tokens = _served_gate(teacher, teacher_prefixes, drafts, q, positions, active, cfg,
                                                       rule, seed)
        else:
            teacher_logits = verify(teacher_stepper, pending, drafts)
            decision = rule.decide(q, teacher_logits, positions, drafts)
            gate, exceed = decision.gate, decision.teacher_writes

        def teacher_token(first: Tensor, hit: Tensor, logits: Optional[Tensor] = teacher_logits,
                          drafts: Tensor = drafts, active: Tensor = active,
                          sampled: Optional[Tensor] = served_tokens) -> Tensor:
            if logits is not None:
                return choose(logits[torch.arange(B, device=device), first])
            if sampled is not None:
                return sampled[torch.arange(B, device=device), first]
            return _served_tokens(teacher, teacher_prefixes, drafts, first, hit & active, cfg, pad, generator, device)

        tokens, by_teacher, n_decided = decide(exceed, drafts, teacher_token, active, N - decided, eos_ids)
        columns = torch.where(torch.arange(block, device=device) < n_decided[:, None], positions, N)
        logprob = torch.log_softmax(q, -1).gather(-1, tokens[..., None]).squeeze(-1) if mixed else None
        record.write(columns, tokens, torch.zeros_like(by_teacher) if mixed else by_teacher, gate, teacher_logits, logprob)
        record.done |= active & torch.isin(tokens, eos_ids).logical_and(columns < N).any(1)
        for b in active.nonzero().flatten().tolist():
            new = tokens[b, :int(n_decided[b])].tolist()
            prefixes[b] += new
            teacher_prefixes[b] += new
        decided = decided + n_decided
        rejected = 0.9 * rejected + float((by_teacher.any(1) & active).sum())
        examined = 0.9 * examined + float(n_decided.sum())
        if not bool((~record.done & (decided < N)).any()):
            break
        has_pending = int(pending is not None)
        for stepper in (student_stepper, teacher_stepper):
            if stepper is not None:
                stepper.keep(torch.where(active, n_decided - 1 + has_pending, 0), block - 1 + has_pending)
        last = tokens.gather(1, (n_decided - 1).clamp(min=0)[:, None]).squeeze(1)
        pending = torch.where(n_decided > 0, last, pad)
        if cfg.adapt_k:
            draft_len = next_k((rejected + 0.1) / (examined + 1.0), cost, cfg.max_draft_k)
    forwards["student"] = student_stepper.forwards
    forwards["teacher"] = teacher_stepper.forwards if teacher_stepper is not None else forwards["drafts"]
    return record.output(input_ids, forwards)


def _draft(drafter: Any, prefixes: List[List[int]], active: Tensor, block: int, cfg: RolloutConfig, pad: int,
           generator: torch.Generator, device: torch.device) -> Tensor:
    """``block`` drafted tokens per row ``[B, block]`` (the active rows' vLLM samples, padded after an early EOS)."""
    rows = active.nonzero().flatten().tolist()
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    samples = drafter.sample([prefixes[b] for b in rows], block, cfg, cfg.eos_token_id, seed=seed,
                             greedy=not cfg.do_sample)
    out = torch.full((active.shape[0], block), pad, dtype=torch.long)
    for b, toks in zip(rows, samples):
        toks = toks[:block]
        if toks:
            out[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out.to(device)


def _served_gate(teacher: Any, prefixes: List[List[int]], drafts: Tensor, q: Tensor, positions: Tensor,
                 active: Tensor, cfg: RolloutConfig, rule: Rule, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rule's decisions against a served teacher's top k over a drafted block, from one sampled step per drafted
    position (:meth:`switchkd.served.ServedTeacher.next_tokens` after the row's prefix and the drafts before it).

    A rule that reads the proposal (SKD's rank) sees the teacher's top k as logits (``-inf`` elsewhere: a draft
    outside them ranks k, exact while its K is at most k); a gate compares the two models over the k + 1 outcomes
    top k + tail (:func:`switchkd.divergences.with_tail`).

    Returns:
        ``(gate [B, block], exceed [B, block], teacher_tokens [B, block])``: inactive rows' gate NaN, never exceeding;
        the server's sampled token at every position (the teacher's token wherever it writes).
    """
    from switchkd.divergences import TopKTail, with_tail

    B, block, vocab = q.shape
    k = teacher.top_k
    rows = active.nonzero().flatten().tolist()
    where = [(b, j) for b in rows for j in range(block)]
    answers = teacher.next_tokens([prefixes[b] + drafts[b, :j].tolist() for b, j in where], cfg, cfg.eos_token_id,
                                  seed=seed)
    ids = torch.zeros(B, block, k, dtype=torch.long)
    logp = torch.full((B, block, k), -float(torch.log(torch.tensor(float(vocab)))))
    tokens = torch.zeros(B, block, dtype=torch.long)
    for (b, j), (token, top, values) in zip(where, answers):
        ids[b, j], logp[b, j], tokens[b, j] = torch.tensor(top), torch.tensor(values, dtype=torch.float32), token
    ids, logp, tokens = ids.to(q.device), logp.to(q.device), tokens.to(q.device)
    if rule.reads_proposal:
        known = torch.full((B, block, vocab), -float("inf"), device=q.device).scatter(-1, ids, logp)
        decision = rule.decide(q, known, positions, drafts)
    else:
        lq, lp = with_tail(q.reshape(-1, vocab), TopKTail(logp.reshape(-1, k), ids.reshape(-1, k), vocab))
        decision = rule.decide(lq.reshape(B, block, k + 1), lp.reshape(B, block, k + 1), positions, drafts)
    gate = decision.gate.to(q.dtype)
    nan = torch.full_like(gate, float("nan"))
    return torch.where(active[:, None], gate, nan), decision.teacher_writes & active[:, None], tokens


def _served_tokens(teacher: Any, prefixes: List[List[int]], drafts: Tensor, first: Tensor, hit: Tensor,
                   cfg: RolloutConfig, pad: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The served teacher's token at each hit row's ``first`` drafted position ``[B]`` (sampled by the server with the
    run's settings; pad where no row is hit)."""
    out = torch.full((drafts.shape[0],), pad, dtype=torch.long)
    rows = hit.nonzero().flatten().tolist()
    if rows:
        seed = int(torch.randint(2 ** 30, (), generator=generator))
        prompts = [prefixes[b] + drafts[b, :int(first[b])].tolist() for b in rows]
        for b, toks in zip(rows, teacher.sample(prompts, 1, cfg, cfg.eos_token_id, seed=seed)):
            out[b] = toks[0] if toks else pad
    return out.to(device)
