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
from switchkd.schema import COUNT, opt

if TYPE_CHECKING:
    from switchkd.config import Config
    from switchkd.rules import Rule


@dataclass
class SkdConfig:
    """``method.skd``: SKD's acceptance rule."""

    top_k: int = opt(25, "K: a student token outside the teacher's top K is replaced by a teacher sample (the "
                     "paper's K = 25)", rule=COUNT)


class SkdSource(SwitchSource):
    """SKD sequences (with probability ``method.switch.ratio``, else dataset batches)."""

    name: ClassVar[str] = "skd"
    section: ClassVar[Optional[str]] = "skd"
    Section: ClassVar[Optional[type]] = SkdConfig
    prefix = "skd"
    warn_saturation = False  # a teacher share near 0 or 1 is SKD's own schedule, not a mis-set threshold

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        needs = super().needs(cfg)
        if needs.served_teacher is None and cfg.teacher is not None and cfg.method.skd.top_k > cfg.teacher.top_k:
            return replace(needs, served_teacher=f"method.skd.top_k={cfg.method.skd.top_k} ranks beyond the "
                           f"teacher.top_k={cfg.teacher.top_k} log-probabilities the server returns; raise teacher.top_k")
        return needs

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """SKD's rank test with K = ``method.skd.top_k`` (:class:`switchkd.rules.Rank`)."""
        from switchkd.rules import Rank

        return Rank(top_k=cfg.method.skd.top_k)
