"""The rollout engine: one batched, KV-cached lockstep decoding loop for student, teacher, or both.

Who writes each token is the loop's :class:`~switchkd.rules.Rule` (:mod:`switchkd.rules`: the student, the teacher,
MiniLLM's mixture, SWITCH's gate, SKD's rank test); this module samples, feeds both KV caches and records.  A
verifiable rule (SWITCH, SKD) decodes by draft-and-verify (:mod:`switchkd.speculative`) unless ``cfg.speculative``
is off or the models are sharded.  With ``compile`` on (``auto``: on CUDA) the lockstep loop uses static KV caches
and a compiled one-token step, and checks for "all rows done" only every ``sync_every`` steps, so no host
synchronisation happens per token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from switchkd.decoding import (  # noqa: F401  (re-exported: the public names of the engine)
    GATES,
    Record,
    RolloutConfig,
    RolloutOutput,
    Stepper,
    chooser,
    finished,
    head_rows,
    mix_logits,
    mix_logprobs,
    setup,
    teacher_prompts,
    use_compile,
)
from switchkd.distributed import is_sharded
from switchkd.rules import Decision, Gate, Mixture, Rank, Rule, StudentWrites, TeacherWrites  # noqa: F401
from switchkd.sections import decoding_of
from switchkd.speculative import speculative_switch


def from_method(method: Any, max_new_tokens: int, tokenizer: Any, vocab: int, keep_teacher_logits: bool = False,
                **engine: Any) -> RolloutConfig:
    """The :class:`RolloutConfig` of a training config's ``method`` section: its decoding fields, ``compile``, the
    response budget and the tokenizer's EOS/pad, plus a source's ``engine`` settings
    (:meth:`switchkd.methods.base.Source.engine_settings`)."""
    return RolloutConfig(max_new_tokens=max(1, max_new_tokens), **decoding_of(method.decoding),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
                         keep_teacher_logits=keep_teacher_logits, compile=method.compile, **engine)


def choose_tokens(rule: Rule, choose: Any, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor],
                  position: int) -> tuple[Tensor, Decision]:
    """One step of every row: the rule's decision and the token it writes.

    Args:
        rule: who writes.
        choose: the sampler (:func:`switchkd.decoding.chooser`): ``logits [B, V] -> tokens [B]``.
        student_logits, teacher_logits: ``[B, V]`` each model's next-token logits (None for a model the rule
            does not use).
        position: the response position of this step.

    Returns:
        ``(tokens [B], decision)``: a proposal is sampled first where the rule reads one, then the teacher's token,
        then the student's (a seeded run draws in that order).
    """
    proposal = choose(student_logits) if rule.reads_proposal else None
    decision = rule.decide(student_logits, teacher_logits, position, proposal)
    if decision.mixture is not None:
        return choose(decision.mixture), decision
    if not rule.uses_teacher:
        return choose(student_logits), decision
    if not rule.uses_student:
        return choose(teacher_logits), decision
    teacher_token = (choose(teacher_logits) if decision.teacher_sampling is None
                     else choose.unwarped(decision.teacher_sampling))
    student_token = proposal if proposal is not None else choose(student_logits)
    return torch.where(decision.teacher_writes, teacher_token, student_token), decision


@torch.no_grad()
def rollout(
    student: Optional[Any],
    teacher: Optional[Any],
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: RolloutConfig,
    rule: Rule,
    teacher_input_ids: Optional[Tensor] = None,
    teacher_attention_mask: Optional[Tensor] = None,
) -> RolloutOutput:
    """Decode ``cfg.max_new_tokens`` tokens after left-padded prompts, the writer of each chosen by ``rule``.

    Args:
        student, teacher: the models (None for one the rule does not use).
        input_ids, attention_mask: left-padded prompts ``[B, P]``.
        cfg: the sampling and engine settings.
        rule: who writes each token (:mod:`switchkd.rules`).
        teacher_input_ids, teacher_attention_mask: the teacher's own left-padded prompts ``[B, P']`` (response
            priming); the generated tokens are shared.

    Returns:
        :class:`RolloutOutput`: ``sequences [B, P + N]``, ``response_mask``/``from_teacher``/``gate`` ``[B, N]``.
        With a sharded model (FSDP2, ZeRO-3) the loop is rank-synchronised, eager and lockstep (``speculative`` and
        ``compile`` are not used): every rank steps until all ranks are done.
    """
    uses_student, uses_teacher = rule.uses_student, rule.uses_teacher
    reference = student if uses_student else teacher
    if reference is None or (uses_teacher and teacher is None):
        raise ValueError(f"{type(rule).__name__} needs the {'teacher' if uses_teacher else 'student'} model")
    teacher_ids, teacher_mask = teacher_prompts(input_ids, attention_mask, teacher_input_ids, teacher_attention_mask)
    synced = (uses_student and is_sharded(student)) or (uses_teacher and is_sharded(teacher))  # collective forwards
    if rule.verifiable and cfg.speculative and not synced:
        return speculative_switch(student, teacher, input_ids, attention_mask, cfg, rule, teacher_ids, teacher_mask)
    device = input_ids.device
    vocab, eos_ids, pad, choose = setup(reference, cfg, device)
    rows, budget = input_ids.shape[0], cfg.max_new_tokens
    static = use_compile(cfg, device) and not synced
    options = dict(static=static, capacity=budget, compiled=static)
    student_stepper = Stepper(student, input_ids, attention_mask, vocab, **options) if uses_student else None
    teacher_stepper = Stepper(teacher, teacher_ids, teacher_mask, vocab, **options) if uses_teacher else None
    record = Record(rows, budget, vocab, pad, device, cfg.keep_teacher_logits and uses_teacher, rule.samples_mixture)
    sync = cfg.sync_every or (1 if device.type == "cpu" else 8)
    position = 0
    while True:
        student_logits = student_stepper.logits if student_stepper else None
        teacher_logits = teacher_stepper.logits if teacher_stepper else None
        tokens, decision = choose_tokens(rule, choose, student_logits, teacher_logits, position)
        logprob = (torch.log_softmax(student_logits, -1).gather(-1, tokens[:, None])  # MiniLLM's q_old
                   if rule.samples_mixture else None)
        live = ~record.done
        columns = torch.where(live, position, budget)[:, None]
        record.write(columns, tokens[:, None], (decision.teacher_writes & live)[:, None], decision.gate[:, None],
                     teacher_logits[:, None] if record.kept is not None else None, logprob)
        record.done |= torch.isin(tokens, eos_ids) & live
        if synced:  # ranks step together until every rank is done; a rank past its end decodes into the trash column
            record.done |= position >= budget - 1
            if finished(bool(record.done.all()), synced, device):
                break
        elif position == budget - 1 or ((position + 1) % sync == 0 and bool(record.done.all())):
            break
        for stepper in (student_stepper, teacher_stepper):
            if stepper is not None:
                stepper.feed(tokens[:, None])
        position += 1
    return record.output(input_ids, {"student": student_stepper.forwards if student_stepper else 0,
                                     "teacher": teacher_stepper.forwards if teacher_stepper else 0})
