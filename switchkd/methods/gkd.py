"""GKD (Agarwal et al., ICLR 2024; ``source: mixture``), as TRL's ``GKDTrainer`` runs it.

Each batch is student-generated with probability ``method.mixture.student_ratio`` (lambda), else the
dataset's, or with ``method.mixture.seq_kd`` (TRL's option) the teacher's sampled responses, fresh each
time.  No dropout while the student generates nor while it trains (TRL's ``disable_dropout=True``);
the loss's temperature is 1 (TRL applies its ``temperature`` to sampling only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from switchkd.methods.base import Needs, Source
from switchkd.schema import PROB, opt

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config


@dataclass
class MixtureConfig:
    """``method.mixture``: GKD's data mixture."""

    student_ratio: float = opt(0.5, "lambda: the probability that a batch is student-generated", rule=PROB)
    seq_kd: bool = opt(False, "TRL's seq_kd: the other batches are teacher samples instead of the dataset's")


class MixtureSource(Source):
    """Student samples with probability lambda, else dataset (or teacher) responses."""

    name: ClassVar[str] = "mixture"
    section: ClassVar[Optional[str]] = "mixture"
    Section: ClassVar[Optional[type]] = MixtureConfig
    dropout = False

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        seq_kd = cfg.method.mixture.seq_kd
        return Needs(teacher="method.mixture.seq_kd=true" if seq_kd else None,
                     across_vocabularies="seq_kd=true samples the teacher's responses in its own vocabulary"
                     if seq_kd else None,
                     vllm=None)  # its rollouts are the student's own samples

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        from switchkd.rules import StudentWrites, TeacherWrites

        if self.shared.random() < self.settings.student_ratio:
            return self._rollout(batch, StudentWrites())[0]
        if self.settings.seq_kd:
            return self._rollout(batch, TeacherWrites())[0]
        return batch
