"""SeqKD (Kim & Rush, 2016; ``source: teacher``): the teacher's response to each prompt, generated once
and reused every epoch (the same as ``switchkd generate`` followed by SFT)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional

from switchkd.methods.base import Source

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config


class TeacherSource(Source):
    """The teacher's responses, decoded the first time a prompt is seen and then cached (checkpointed)."""

    name: ClassVar[str] = "teacher"
    decodes: ClassVar[bool] = True

    @classmethod
    def teacher_reason(cls, cfg: "Config") -> Optional[str]:
        return "method.source=teacher"

    @classmethod
    def cross_tokenizer_reason(cls, cfg: "Config") -> Optional[str]:
        return "the teacher writes its responses in its own vocabulary (generate them with switchkd generate, then train on the text)"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cache: Dict[int, List[int]] = {}

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        idx = batch.index.tolist()
        missing = [i for i, k in enumerate(idx) if k not in self.cache]
        if missing:
            gen, _ = self._rollout(batch.select(missing), "teacher")
            for i, response in zip(missing, gen.responses()):
                self.cache[idx[i]] = response
        return batch.with_responses([self.cache[k] for k in idx], self.tok.pad_token_id)

    def state_dict(self) -> Dict[str, Any]:
        return super().state_dict() | {"cache": self.cache}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cache = state["cache"]
