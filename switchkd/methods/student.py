"""On-policy distillation (``source: student``): fresh student samples for every batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

from switchkd.methods.base import Source

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config


class StudentSource(Source):
    """The student's own sampled responses (``method.decoding``)."""

    name: ClassVar[str] = "student"
    decodes: ClassVar[bool] = True

    @classmethod
    def vllm_reason(cls, cfg: "Config") -> Optional[str]:
        return None  # its rollouts are the student's own samples

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        return self._rollout(batch, self.rule(self.cfg))[0]
