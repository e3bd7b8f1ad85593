"""On-policy distillation (``source: student``): fresh student samples for every batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from switchkd.methods.base import Needs, Source

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config


class StudentSource(Source):
    """The student's own sampled responses (``method.decoding``)."""

    name: ClassVar[str] = "student"

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        return Needs(vllm=None)  # its rollouts are the student's own samples

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        return self._rollout(batch, self.rule(self.cfg))[0]
