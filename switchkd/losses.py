"""The training objective: kd_ratio * divergence + (1 - kd_ratio) * CE over response tokens.

Normalisation: the loop sums :func:`token_loss` over the response tokens of each
micro-batch and divides by the number of response tokens in the whole
optimizer step (all micro-batches, all processes), so the gradient does not
depend on how a step is split.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from switchkd.batch import Batch, PolicyTerm
from switchkd.cross import Aligned
from switchkd.distributed import is_sharded, max_over_ranks
from switchkd.divergence_table import PLAIN
from switchkd.divergences import TopK, cross_entropy, divergence, forward_kl

if TYPE_CHECKING:
    from switchkd.config import MethodConfig

TeacherTargets = Union[Tensor, TopK, Aligned]  # teacher logits [N, V], cached top-k rows, or aligned groups


def kd_weight(method: MethodConfig) -> float:
    """Weight of the divergence term (0 for the divergence that trains by CE alone, ``checks.PLAIN``).
    The method's ``name`` is a label and never changes behaviour."""
    return 0.0 if method.divergence == PLAIN else method.kd_ratio


def policy_loss(student_logits: Tensor, labels: Tensor, pg: PolicyTerm) -> Tensor:
    """A clipped policy-gradient term per token (PPO; LMOps ``_pg_loss``, per token):
    ``max(-A r, -A clamp(r, 1 - clip, 1 + clip))`` with ``r = exp(log q(y) - log q_old(y)) * w``.

    Args:
        student_logits: ``[N, V]`` the student's logits at the response tokens.
        labels: ``[N]`` the sampled token ids.
        pg: the batch's advantage A, old log-probability log q_old and importance weight w, each ``[N]``.

    Returns:
        ``[N]`` the term per token.
    """
    logp = torch.log_softmax(student_logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    ratio = torch.exp(logp - pg.old_logprob) * pg.weight
    adv = pg.advantage
    return torch.max(-adv * ratio, -adv * ratio.clamp(1.0 - pg.clip, 1.0 + pg.clip))


def token_loss(student_logits: Tensor, teacher_logits: Optional[TeacherTargets], labels: Tensor, method: MethodConfig,
               pg: Optional[PolicyTerm] = None) -> Tensor:
    """The per-token objective: ``kd_ratio`` x the divergence + (1 - ``kd_ratio``) x CE (+ the policy term).

    Args:
        student_logits: ``[N, V]`` the student's logits at the response tokens.
        teacher_logits: the teacher's targets at the same tokens: ``[N, V]`` logits, a cached ``TopK``, a served
            ``TopKTail`` or, across vocabularies, an ``Aligned`` view (None without a divergence term).
        labels: ``[N]`` the target token ids.
        method: the ``method`` section (divergence, its parameters and temperature, ``kd_ratio``).
        pg: the batch's policy term (MiniLLM), or None.

    Returns:
        ``[N]`` float32, the loss of each token.
    """
    w = kd_weight(method)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if w > 0:
        if teacher_logits is None:
            raise ValueError(f"method {method.name!r} with kd_ratio={w} needs teacher logits")
        if isinstance(teacher_logits, Aligned):  # another vocabulary: ULD / GOLD over aligned groups
            out = out + w * teacher_logits.alignment.view.token_loss(student_logits, teacher_logits, labels)
        else:
            params = {k: (int(v) if k == "k" else v) for k, v in method.params.items()}
            out = out + w * divergence(method.divergence, student_logits, teacher_logits,
                                       temperature=method.temperature, **params)
    if w < 1:
        out = out + (1 - w) * cross_entropy(student_logits, labels=labels)
    if pg is not None:
        out = out + policy_loss(student_logits, labels, pg)
    return out


@torch.no_grad()
def teacher_targets(teacher: Any, batch: Batch, vocab: int) -> TeacherTargets:
    """The teacher's targets at the batch's response tokens, aligned with the student's.

    The ones the batch already carries (``teacher_selected``: kept from a rollout, or a cached ``TopK``), a served
    teacher's top k, else one teacher forward.  With priming the teacher reads ``teacher_input_ids`` (its prefix + the
    same response); each side's own labels select the positions, so no offset arithmetic is involved.

    Args:
        teacher: the teacher model (or a served teacher).
        batch: the micro-batch, ``input_ids``/``labels [B, T]``.
        vocab: the shared vocabulary size V.

    Returns:
        ``[N, V]`` logits (N response tokens), or a ``TopK``/``TopKTail``/``Aligned`` form of them.
    """
    if batch.teacher_selected is not None:
        return batch.teacher_selected
    if getattr(teacher, "served", False):  # a teacher on a vLLM server: its top-k log-probabilities (a TopKTail)
        return teacher.targets(batch, vocab)
    if batch.alignment is not None:  # another vocabulary: the teacher's own tokens, merged over aligned groups
        view = batch.alignment.view
        logits = response_logits(teacher, batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels,
                                 view.teacher_vocab)[0]
        return view.targets(logits, batch)
    if batch.teacher_input_ids is not None:
        return response_logits(teacher, batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels,
                               vocab)[0]
    return response_logits(teacher, batch.input_ids, batch.attention_mask, batch.labels, vocab)[0]


def shifted(logits: Tensor, labels: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Select next-token logits at response positions.

    Args:
        logits: ``[B, T, V']`` a model's logits.
        labels: ``[B, T]`` the token ids, -100 outside the response.
        vocab: the true vocabulary size (logit columns beyond it are dropped).

    Returns:
        ``(logits [N, vocab], targets [N])`` with N the number of response tokens.
    """
    target = labels[:, 1:]
    mask = target != -100
    return logits[:, :-1][mask][:, :vocab], target[mask]


def response_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                    vocab: int) -> tuple[Tensor, Tensor]:
    """``shifted(model(...).logits, labels, vocab)`` with the LM head run only from the batch's first
    response position on (``logits_to_keep``, when the model accepts it): prompt positions cost no
    ``[B, P, V]`` logits.

    Args:
        model: a causal LM.
        input_ids, attention_mask, labels: ``[B, T]`` (labels -100 outside the response).
        vocab: the true vocabulary size.

    Returns:
        ``(logits [N, vocab], targets [N])``.
    """
    cols = (labels[:, 1:] != -100).any(0).nonzero()
    keep = labels.shape[1] - (int(cols[0]) if len(cols) else labels.shape[1] - 1)
    kw = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits
    return shifted(logits, labels[:, labels.shape[1] - logits.shape[1]:], vocab)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs do)."""
    base = getattr(model, "module", model)  # DDP / accelerate wrappers
    if hasattr(base, "get_base_model"):  # peft: its forward passes keyword arguments on to the base model
        base = base.get_base_model()
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def prompt_mask(batch: Batch) -> Tensor:
    """``[B, T-1]``: next-token predictions whose target is a real prompt token (the instruction
    positions: label -100, both the input and the target inside the attention mask)."""
    m = batch.attention_mask.bool()
    return (batch.labels[:, 1:] == -100) & m[:, 1:] & m[:, :-1]


def instruction_logits(model: Any, batch: Batch, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """One full forward: ``(response logits [N, vocab], targets [N], prompt logits [M, vocab])`` with
    the prompt positions of :func:`prompt_mask`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    s, target = shifted(logits, batch.labels, vocab)
    return s, target, logits[:, :-1][prompt_mask(batch)][:, :vocab]


def instruction_loss_sum(student: Any, teacher: Any, batch: Batch, method: MethodConfig,
                         vocab: int) -> tuple[Tensor, Tensor]:
    """The objective terms for one micro-batch with an instruction loss (``method.instruction_weight``):
    ``(sum of token_loss over the response, sum of the instruction loss)``, the instruction loss being
    forward KL(p_teacher || p_student) at temperature 1 over the prompt positions (Li et al. 2024,
    ``trainers/custom_trainer.py`` of their code).  The teacher logits a rollout kept
    (``teacher_selected``) serve the response; the prompt needs the teacher's forward."""
    s, target, s_prompt = instruction_logits(student, batch, vocab)
    with torch.no_grad():
        t_resp, _, t_prompt = instruction_logits(teacher, batch, vocab)
    t = batch.teacher_selected
    resp = token_loss(s, t if t is not None else t_resp, target, method, batch.policy).sum()
    return resp, forward_kl(s_prompt, t_prompt).sum()


def response_tokens(labels: Tensor) -> int:
    """Number of predicted response tokens in ``labels [B, T]``."""
    return int((labels[:, 1:] != -100).sum())


def _final_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states ``[B, T, d]`` without materialising ``[B, T, V]`` logits, and the last logits."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1], out.logits[:, -1]


def chunked_loss_sum(student: Any, head: torch.nn.Module, batch: Batch, teacher: Optional[Any],
                     teacher_selected: Optional[TeacherTargets], method: MethodConfig, vocab: int, chunk: int) -> Tensor:
    """The same sum as ``token_loss(shifted(...)).sum()``, with the LM head and the divergence evaluated
    ``chunk`` response tokens at a time under activation checkpointing, so the loss's peak memory stays
    near ``chunk x V`` instead of several ``[B, T, V]`` tensors.

    ``head`` is the student's (unwrapped) output embedding; under FSDP2/ZeRO-3 the head is sharded and
    every call is collective, so all ranks run the same number of chunks.  The teacher side is chunked the same way
    unless its logits were already computed (``teacher_selected``: ``[N, V]`` or a cached ``TopK``).  Raises ``ValueError`` when
    the model's logits are not ``head(last hidden state)`` (soft-capping, scaling), checked on the
    last position.
    """
    hidden, last = _final_hidden(student, batch.input_ids, batch.attention_mask)
    if not torch.allclose(head(hidden[:, -1]).float(), last.float(), rtol=1e-3, atol=1e-3):
        raise ValueError("this model's logits are not its LM head applied to the last hidden state")
    target = batch.labels[:, 1:]
    mask = target != -100
    h, tgt = hidden[:, :-1][mask], target[mask]
    t_src, t_head = teacher_selected, None
    if t_src is None and kd_weight(method) > 0:
        primed = batch.teacher_input_ids is not None
        t_labels = (batch.teacher_labels if primed else batch.labels)[:, 1:]
        with torch.no_grad():
            t_hidden, _ = _final_hidden(teacher, batch.teacher_input_ids if primed else batch.input_ids,
                                        batch.teacher_attention_mask if primed else batch.attention_mask)
        t_src, t_head = t_hidden[:, :-1][t_labels != -100], teacher.get_output_embeddings()

    pg = batch.policy

    def piece(h_c: Tensor, t_c: Optional[TeacherTargets], y_c: Tensor, pg_c: Optional[PolicyTerm]) -> Tensor:
        t_logits = t_c if t_head is None else t_head(t_c).detach()
        if isinstance(t_logits, Tensor):  # a cached TopK is already over the vocabulary
            t_logits = t_logits[:, :vocab]
        return token_loss(head(h_c)[:, :vocab], t_logits, y_c, method, pg_c).sum()

    total = h.new_zeros((), dtype=torch.float32)
    n = -(-h.shape[0] // chunk)
    # a sharded head all-gathers its weight at every call (and again in backward): every rank runs as
    # many chunks as the rank with the most response tokens, the extra ones on one row weighted 0
    steps = max_over_ranks(n, h.device) if is_sharded(student) else n
    for j in range(steps):
        i = j * chunk if j < n else 0
        t_c = t_src[i:i + chunk] if t_src is not None else None
        pg_c = pg.slice(i, i + chunk) if pg is not None else None
        part = checkpoint(piece, h[i:i + chunk], t_c, tgt[i:i + chunk], pg_c, use_reentrant=False)
        total = total + (part if j < n else 0.0 * part)
    return total


def micro_batch_loss(student: Any, teacher: Optional[Any], batch: Batch, method: MethodConfig, vocab: int,
                     loss_chunk: int = 0, head: Optional[torch.nn.Module] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The objective's sums for one micro-batch: ``(sum of token_loss over its response tokens, sum of the
    instruction loss over its prompt positions or None)`` — by the chunked head (``loss_chunk`` > 0, the
    student's ``head``), with the instruction loss (``method.instruction_weight`` > 0), or plainly."""
    if getattr(teacher, "served", False) and batch.teacher_selected is None and kd_weight(method) > 0:
        batch.teacher_selected = teacher.targets(batch, vocab)  # every path below reads the served top-k from here
    if loss_chunk > 0:
        return chunked_loss_sum(student, head, batch, teacher, batch.teacher_selected, method, vocab, loss_chunk), None
    if method.instruction_weight > 0:
        return instruction_loss_sum(student, teacher, batch, method, vocab)
    t = teacher_targets(teacher, batch, vocab) if kd_weight(method) > 0 else None
    s, target = response_logits(student, batch.input_ids, batch.attention_mask, batch.labels, vocab)
    return token_loss(s, t, target, method, batch.policy).sum(), None
