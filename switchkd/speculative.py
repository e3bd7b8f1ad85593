"""Draft-and-verify decoding of a verifiable rule (SWITCH's gate, SKD's rank; :mod:`switchkd.rules`) with per-row
acceptance: the lockstep loop's tokens at near on-policy cost.

Each block, the student drafts k tokens with its cache and the teacher scores all k positions
in one forward (together with the last decided token, so a block costs one teacher forward).
Every row decides on its own: its drafts up to (not including) its first position where the
gate exceeds tau_t are the student's tokens under the SWITCH rule; at that position the teacher
writes (sampled, or its argmax).  Rows therefore advance by different numbers of tokens per
block, and one row's rejection does not end another's block.  Caches are never cropped: the
columns of a row's rejected drafts become masked holes in its attention mask and the row's next
position moves back (:meth:`switchkd.decoding.Stepper.keep`), so every row's next block starts
from exactly the state that lockstep decoding would have.

Under greedy decoding in float32 the tokens equal the lockstep engine's.  In bf16/fp16 a k-token
verification forward rounds differently from k one-token forwards, so a gate value near tau_t
may fall the other way and the two may differ there.  Under sampling each decided token is drawn
from the same distribution as in lockstep (a student draft at a position where the gate does not
exceed tau_t *is* a sample of the student's distribution there; where it exceeds, the teacher
is sampled), so the sequence distribution is the same, though a seeded run consumes random
numbers in a different order.  Each block's k minimises the expected cost per decided token,
(c + k) / E[decided], from a running estimate of the per-position rejection rate r over all
rows (E[decided] = (1 - (1 - r)^k) / r) and the teacher/student forward-cost ratio c; with
frequent rejections it falls to k = 1.  k depends only on past decisions, so a seeded run is
reproducible.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from switchkd.decoding import Record, RolloutConfig, RolloutOutput, Stepper, setup, teacher_prompts
from switchkd.rules import Gate, Rule


@torch.no_grad()
def speculative_switch(student: Any, teacher: Any, input_ids: Tensor, attention_mask: Tensor, cfg: RolloutConfig,
                       rule: Rule, teacher_input_ids: Optional[Tensor] = None,
                       teacher_attention_mask: Optional[Tensor] = None) -> RolloutOutput:
    """A verifiable rule (SWITCH's gate, SKD's rank) by draft-and-verify.

    Args:
        student, teacher: the models.
        input_ids, attention_mask: left-padded prompts ``[B, P]``.
        cfg: the sampling and engine settings (``draft_k``, ``max_draft_k``, ``adapt_k``, ``teacher_cost``).
        rule: who writes, decided over each drafted block at once (``rule.verifiable``).
        teacher_input_ids, teacher_attention_mask: the teacher's own prompts ``[B, P']`` (priming).

    Returns:
        The same :class:`~switchkd.decoding.RolloutOutput` as :func:`switchkd.rollout.rollout`, with ``forwards``
        counting the teacher's row verifications (``teacher_rows``).
    """
    if not rule.verifiable:
        raise ValueError(f"draft-and-verify decides a verifiable rule, got {type(rule).__name__}")
    device = input_ids.device
    vocab, eos_ids, pad, choose = setup(student, cfg, device)
    student_stepper = Stepper(student, input_ids, attention_mask, vocab)
    teacher_stepper = Stepper(teacher, *teacher_prompts(input_ids, attention_mask, teacher_input_ids,
                                                        teacher_attention_mask), vocab)
    rows, budget = input_ids.shape[0], cfg.max_new_tokens
    record = Record(rows, budget, vocab, pad, device, cfg.keep_teacher_logits)
    decided = torch.zeros(rows, dtype=torch.long, device=device)  # decided tokens per row
    draft_len = max(1, cfg.draft_k)
    cost = cfg.teacher_cost if cfg.teacher_cost is not None else cost_ratio(teacher, student)
    pending: Optional[Tensor] = None  # each row's last decided token, not yet fed to the teacher
    rejected, examined = 0.0, 0.0  # decayed counts behind the rejection-rate estimate
    row_checks = 0  # rows verified, summed over blocks (a row's block = one verification of its drafts)
    while True:
        active = ~record.done & (decided < budget)
        if not bool(active.any()):
            break
        block = min(draft_len, budget - int(decided[active].min()))
        student_logits, drafted = [], []
        for j in range(block):  # the student drafts ``block`` tokens per row
            student_logits.append(student_stepper.logits)
            drafted.append(choose(student_stepper.logits))
            if j < block - 1:
                student_stepper.feed(drafted[-1][:, None])
        drafts, q = torch.stack(drafted, 1), torch.stack(student_logits, 1)  # [B, block], [B, block, V]
        p = verify(teacher_stepper, pending, drafts)  # [B, block, V] in one teacher forward
        positions = decided[:, None] + torch.arange(block, device=device)  # response positions [B, block]
        decision = rule.decide(q, p, positions, drafts)
        teacher_choice = (choose if decision.teacher_sampling is None else choose.unwarped,
                          p if decision.teacher_sampling is None else decision.teacher_sampling)
        tokens, by_teacher, n_decided = decide(
            decision.teacher_writes, drafts,
            lambda first, hit, pick=teacher_choice: pick[0](pick[1][torch.arange(rows, device=device), first]), active,
            budget - decided, eos_ids)
        row_checks += int(active.sum())
        columns = torch.where(torch.arange(block, device=device) < n_decided[:, None], positions, budget)
        record.write(columns, tokens, by_teacher, decision.gate, p if record.kept is not None else None)
        last = tokens.gather(1, (n_decided - 1).clamp(min=0)[:, None]).squeeze(1)
        record.done |= active & torch.isin(tokens, eos_ids).logical_and(columns < budget).any(1)
        decided = decided + n_decided
        has_pending = pending is not None
        rejected = 0.9 * rejected + float((by_teacher.any(1) & active).sum())  # about the last 10 blocks
        examined = 0.9 * examined + float(n_decided.sum())
        if not bool((~record.done & (decided < budget)).any()):
            break
        # caches: keep each row's decided columns, mask the rest; feed the last decided token
        student_stepper.keep((n_decided - 1).clamp(min=0), block - 1)
        teacher_stepper.keep(torch.where(active, n_decided - 1 + int(has_pending), 0), block - 1 + int(has_pending))
        pending = torch.where(n_decided > 0, last, pad)
        student_stepper.feed(pending[:, None])  # the student needs its next logits now; the teacher gets it next block
        student_stepper.keep((n_decided > 0).long(), 1)
        if cfg.adapt_k:
            draft_len = next_k((rejected + 0.1) / (examined + 1.0), cost, cfg.max_draft_k)  # a weak prior: r = 0.1
    return record.output(input_ids, {"student": student_stepper.forwards, "teacher": teacher_stepper.forwards,
                                     "teacher_rows": row_checks})


@torch.no_grad()
def draft_stats(draft: Any, target: Any, input_ids: Tensor, attention_mask: Tensor, k: int, max_new_tokens: int,
                eos_token_id: Any, pad_token_id: int, vocab: int) -> dict:
    """A model's worth as a greedy speculative-decoding draft for ``target`` (Leviathan et al., 2023):
    ``draft`` proposes ``k`` tokens, ``target`` verifies them in one forward and keeps the longest prefix
    equal to its own argmax, then writes its argmax at the first mismatch.  Runs this module's
    draft-and-verify loop with the ``argmax`` gate and a fixed k; the tokens are ``target``'s greedy
    output.  Prompts ``[B, P]`` left-padded.  Returns ``tokens_per_verification`` (decided tokens per
    row verification, at most k), ``accepted_per_verification`` (draft tokens kept) and
    ``acceptance`` (the share of decided tokens the draft wrote), with the counts."""
    cfg = RolloutConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, vocab_size=vocab, draft_k=k, max_draft_k=k, adapt_k=False)
    out = speculative_switch(draft, target, input_ids, attention_mask, cfg, Gate(tau0=0.5, schedule="const",
                                                                                 divergence="argmax"))
    decided = int(out.response_mask.sum())
    by_target = int((out.from_teacher & out.response_mask).sum())
    checks = max(1, out.forwards["teacher_rows"])
    return {"k": k, "tokens": decided, "verifications": checks, "tokens_per_verification": decided / checks,
            "accepted_per_verification": (decided - by_target) / checks,
            "acceptance": (decided - by_target) / max(1, decided)}


def decide(exceed: Tensor, drafts: Tensor, teacher_token: Any, active: Tensor, room: Tensor,
           eos_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row decisions of a drafted block, for every draft-and-verify loop.

    Args:
        exceed: ``[B, k]`` where the rule has the teacher write instead of the draft.
        drafts: the student's drafted tokens ``[B, k]``.
        teacher_token: ``(first [B], hit [B]) -> [B]``: the teacher's token at each row's position ``first``
            (used where ``hit``).
        active: rows still decoding ``[B]``; room: tokens each row may still write ``[B]``.
        eos_ids: the end-of-sequence ids.

    Returns:
        ``(tokens [B, k], by_teacher [B, k], n_decided [B])``: the drafts up to each row's first exceeding
        position, the teacher's token there, the row ending at its EOS or its room.
    """
    block = drafts.shape[1]
    column = torch.arange(block, device=drafts.device)
    hit = exceed.any(1)
    first = torch.where(hit, exceed.float().argmax(1), block - 1)  # the last decided position
    teacher_tokens = teacher_token(first, hit)  # the teacher's token there
    by_teacher = (column[None] == first[:, None]) & hit[:, None]
    tokens = torch.where(by_teacher, teacher_tokens[:, None], drafts)
    decided = torch.minimum(first + 1, room)
    ended = torch.isin(tokens, eos_ids) & (column[None] < decided[:, None])
    decided = torch.where(ended.any(1), ended.float().argmax(1) + 1, decided)  # a row ends at its EOS
    decided = torch.where(active, decided, 0)
    return tokens, by_teacher & (column[None] < decided[:, None]), decided


def verify(stepper: Stepper, pending: Optional[Tensor], drafts: Tensor) -> Tensor:
    """A model's logits at each of the drafted positions.

    Args:
        stepper: the model's cache stepper.
        pending: ``[B]`` each row's last decided token, not yet fed (None in the first block).
        drafts: ``[B, k]`` the drafted tokens.

    Returns:
        ``[B, k, V]``: in at most one forward, the pending token and all drafts but the last fed together.
    """
    if pending is None:
        if drafts.shape[1] == 1:
            return stepper.logits[:, None]
        return torch.cat([stepper.logits[:, None], stepper.feed(drafts[:, :-1])], 1)
    return stepper.feed(torch.cat([pending[:, None], drafts[:, :-1]], 1))


def next_k(r: float, cost: float, max_k: int) -> int:
    """The draft length in ``1..max_k`` minimising ``(cost + k) / E[decided tokens]`` when each
    position is rejected with probability ``r``: a block costs one teacher forward (``cost``
    student forwards) and ``k`` student forwards, and decides ``(1 - (1 - r)^k) / r`` tokens."""
    def per_token(k: int) -> float:
        return (cost + k) / (k if r <= 0 else (1 - (1 - r) ** k) / r)

    return min(range(1, max(1, max_k) + 1), key=per_token)


def cost_ratio(teacher: Any, student: Any) -> float:
    """Teacher/student layer counts (parameter counts when a config has none): a one-token forward
    of a small model costs about per layer; override with ``RolloutConfig.teacher_cost``."""
    layers = [getattr(getattr(m, "config", None), "num_hidden_layers", None) for m in (teacher, student)]
    if all(isinstance(n, int) and n > 0 for n in layers):
        return layers[0] / layers[1]
    return sum(p.numel() for p in teacher.parameters()) / max(1, sum(p.numel() for p in student.parameters()))
