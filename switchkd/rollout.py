"""The rollout engine: one batched, KV-cached decoding loop for student, teacher, or both.

``source="mixed"`` samples each token from MiniLLM's teacher-mixed distribution
alpha p_t + (1 - alpha) q_t (``teacher_mix``).  ``source="switch"`` is SWITCH (Koo et al., NAACL Findings 2025): at response position
t (0 = first generated token) both models see the same prefix; with p_t the teacher's
and q_t the student's next-token distribution, d_t = gate(p_t, q_t) is compared with
tau_t (``exp``: tau0 * exp(-decay * t); ``linear``: tau0 * max(0, 1 - decay * t);
``const``: tau0).  If d_t > tau_t the teacher writes the token (sampled, or its argmax
when greedy), else the student does; the chosen token enters both KV caches.

Two decoders share :mod:`switchkd.decoding` (state, rule, sampler): this module's lockstep
loop (one token per step; every source) and :mod:`switchkd.speculative` (SWITCH by
draft-and-verify with per-row acceptance).  With ``compile`` on (``auto``: on CUDA) the lockstep
loop uses static KV caches and a compiled one-token step, and checks for "all rows done" only
every ``sync_every`` steps, so no host synchronisation happens per token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from switchkd.decoding import (  # noqa: F401  (re-exported: the public names of the engine)
    GATES,
    TOKEN_GATES,
    Record,
    RolloutConfig,
    RolloutOutput,
    Stepper,
    chooser,
    head_rows,
    mix_logits,
    mix_logprobs,
    setup,
    switch_gate,
    threshold,
    thresholds,
    use_compile,
)
from switchkd.distributed import all_ranks, is_sharded
from switchkd.sections import decoding_of
from switchkd.speculative import speculative_switch


def from_method(method: Any, source: str, max_new_tokens: int, tokenizer: Any, vocab: int,
                keep_teacher_logits: bool = False) -> RolloutConfig:
    """The :class:`RolloutConfig` of a training config's shared ``method`` decoding fields (a source then
    sets its own rule with its ``rollout_config``)."""
    m = method
    return RolloutConfig(source=source, max_new_tokens=max(1, max_new_tokens), **decoding_of(m.decoding),
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, vocab_size=vocab, keep_teacher_logits=keep_teacher_logits,
                         compile=m.compile)


@torch.no_grad()
def rollout(
    student: Optional[Any],
    teacher: Optional[Any],
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: RolloutConfig,
    teacher_input_ids: Optional[Tensor] = None,
    teacher_attention_mask: Optional[Tensor] = None,
) -> RolloutOutput:
    """Decode ``cfg.max_new_tokens`` tokens after left-padded prompts ``input_ids [B, P]``.

    The teacher may see its own left-padded prompt (response priming) through
    ``teacher_input_ids``/``teacher_attention_mask``; the generated tokens are shared.
    With a sharded model (FSDP2, ZeRO-3) the loop is rank-synchronised, eager and lockstep
    (``speculative`` and ``compile`` are not used): every rank steps until all ranks are done.
    """
    if cfg.source not in ("student", "teacher", "switch", "mixed"):
        raise ValueError(f"source must be student, teacher, switch or mixed, got {cfg.source!r}")
    use_s, use_t = cfg.source != "teacher", cfg.source != "student"
    ref = student if use_s else teacher
    if ref is None or (use_t and teacher is None):
        raise ValueError(f"source={cfg.source!r} needs the {'teacher' if use_t else 'student'} model")
    t_ids = teacher_input_ids if teacher_input_ids is not None else input_ids
    t_mask = teacher_attention_mask if teacher_attention_mask is not None else attention_mask
    synced = (use_s and is_sharded(student)) or (use_t and is_sharded(teacher))  # FSDP2 / ZeRO-3: collective forwards
    if cfg.source == "switch" and cfg.speculative and not synced:
        return speculative_switch(student, teacher, input_ids, attention_mask, cfg, t_ids, t_mask)
    device = input_ids.device
    vocab, eos_ids, pad, choose, gate_fn = setup(ref, cfg, device)
    B, N = input_ids.shape[0], cfg.max_new_tokens
    static = use_compile(cfg, device) and not synced
    kw = dict(static=static, capacity=N, compiled=static)
    s = Stepper(student, input_ids, attention_mask, vocab, **kw) if use_s else None
    tt = Stepper(teacher, t_ids, t_mask, vocab, **kw) if use_t else None
    rec = Record(B, N, vocab, pad, device, cfg.keep_teacher_logits and use_t, cfg.source == "mixed")
    sync = cfg.sync_every or (1 if device.type == "cpu" else 8)
    t = 0
    while True:
        d = lp = None
        if cfg.source == "student":
            tok, by_t = choose(s.logits), torch.zeros_like(rec.done)
        elif cfg.source == "teacher":
            tok, by_t = choose(tt.logits), torch.ones_like(rec.done)
        elif cfg.source == "mixed":  # MiniLLM: sampled from the mixture (from_teacher stays False)
            q = torch.log_softmax(s.logits, -1)
            tok, by_t = choose(mix_logprobs(q, torch.log_softmax(tt.logits, -1), cfg.teacher_mix)), torch.zeros_like(rec.done)
            lp = q.gather(-1, tok[:, None])  # the student's log-probability of the token: MiniLLM's q_old
        elif cfg.gate in TOKEN_GATES:  # SKD: the student proposes, the teacher replaces what its gate rejects
            draft = choose(s.logits)
            d, by_t = switch_gate(s.logits, tt.logits, t, cfg, gate_fn, draft)
            tok = torch.where(by_t, choose(tt.logits), draft)
        else:
            d, by_t = switch_gate(s.logits, tt.logits, t, cfg, gate_fn)
            tok = torch.where(by_t, choose(tt.logits), choose(s.logits))
        live = ~rec.done
        cols = torch.where(live, t, N)[:, None]
        rec.write(cols, tok[:, None], (by_t & live)[:, None], None if d is None else d[:, None],
                  tt.logits[:, None] if rec.kept is not None else None, lp)
        rec.done |= torch.isin(tok, eos_ids) & live
        if synced:  # ranks step together until every rank is done; a rank past its end decodes into the trash column
            rec.done |= t >= N - 1
            if all_ranks(bool(rec.done.all()), device):
                break
        elif t == N - 1 or ((t + 1) % sync == 0 and bool(rec.done.all())):
            break
        for stepper in (s, tt):
            if stepper is not None:
                stepper.feed(tok[:, None])
        t += 1
    return rec.output(input_ids, {"student": s.forwards if s else 0, "teacher": tt.forwards if tt else 0})
