"""SKD, Speculative Knowledge Distillation (Xu et al., ICLR 2025; ``source: skd``).

Algorithm 1 of the paper: the student samples each response token y_i; when y_i is not among the
teacher's top K tokens at that position, the teacher's own sample replaces it; the student is then
trained by a divergence D(teacher || student) on these sequences (``method.divergence``).  K =
``method.skd.top_k`` (25 in the paper).

This is SWITCH's interleaved decoding with another rule, so it runs through the same engine and the
same decision code (:class:`switchkd.rules.Rank`): the proposal's rank under the teacher (0 for its argmax)
against K, in the lockstep loop and in the draft-and-verify loop alike (a student draft is an SKD proposal; the first rejected one is
replaced by a teacher sample).  ``method.switch.ratio`` and its speculative settings apply.
Diagnostics are logged under ``skd/`` (teacher share by position).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Optional

from switchkd.methods.base import Needs
from switchkd.methods.switch import SwitchSource
from switchkd.schema import COUNT, gt, in_range, opt

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config
    from switchkd.rules import Rule


@dataclass
class SkdConfig:
    """``method.skd``: SKD's acceptance rule."""

    top_k: int = opt(25, "K: a student token outside the teacher's top K is replaced by a teacher sample (the "
                     "paper's K = 25)", rule=COUNT)
    teacher_temperature: float = opt(1.0, "the teacher's sampling temperature, under which its top K is taken and its "
                                     "tokens drawn (the authors' kd_train.yaml: 0.2; 1: the paper's Algorithm 1)",
                                     rule=gt(0))
    teacher_top_p: float = opt(1.0, "the teacher's nucleus: a proposal outside it is never accepted (the authors': "
                               "0.5; 1: off)", rule=in_range(0.0, 1.0, lo_open=True))
    skip_first_token: bool = opt(False, "the loss leaves out each response's first token, as the authors' training "
                                 "code reads the distributions from the first response position on")


class SkdSource(SwitchSource):
    """SKD sequences (with probability ``method.switch.ratio``, else dataset batches)."""

    name: ClassVar[str] = "skd"
    section: ClassVar[Optional[str]] = "skd"
    Section: ClassVar[Optional[type]] = SkdConfig
    prefix = "skd"
    warn_saturation = False  # a teacher share near 0 or 1 is SKD's own schedule, not a mis-set threshold

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        needs, skd = super().needs(cfg), cfg.method.skd
        if needs.served_teacher is None and cfg.teacher is not None and skd.top_k > cfg.teacher.top_k:
            needs = replace(needs, served_teacher=f"method.skd.top_k={skd.top_k} ranks beyond the "
                            f"teacher.top_k={cfg.teacher.top_k} log-probabilities the server returns; raise teacher.top_k")
        own = [f"method.skd.{key}" for key, off in (("teacher_temperature", 1.0), ("teacher_top_p", 1.0),
                                                     ("skip_first_token", False)) if getattr(skd, key) != off]
        if own:  # the authors' settings: the in-process engines, one vocabulary
            why = f"{', '.join(own)} (the authors' settings) work with both models in the process and one vocabulary"
            needs = replace(needs, across_vocabularies=why, served_teacher=needs.served_teacher or why,
                            vllm=why)
        return needs

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """SKD's rank test with K = ``method.skd.top_k`` under the teacher's sampling distribution
        (:class:`switchkd.rules.Rank`)."""
        from switchkd.rules import Rank

        skd = cfg.method.skd
        return Rank(top_k=skd.top_k, temperature=skd.teacher_temperature, top_p=skd.teacher_top_p)

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        new = super().__call__(batch, step)
        return without_first_token(new) if self.settings.skip_first_token else new


def without_first_token(batch: "Batch") -> "Batch":
    """``batch`` with each response's first token left out of the loss (its label -100, its kept teacher logits
    dropped), as the SKD authors' training code reads ``logits[0, prompt_length:]`` (google-research
    ``speculative_kd/train/ddp_skd.py``)."""
    import torch

    labels = batch.labels.clone()
    predicted = labels[:, 1:] != -100  # [B, T - 1]: the positions the loss reads, in the kept logits' order
    first = predicted & (predicted.long().cumsum(1) == 1)
    if batch.teacher_selected is not None and torch.is_tensor(batch.teacher_selected):
        batch.teacher_selected = batch.teacher_selected[~first[predicted]]
    labels[:, 1:][first] = -100
    batch.labels = labels
    return batch
