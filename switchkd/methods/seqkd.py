"""SeqKD (Kim & Rush, 2016; ``source: teacher``): the teacher's response to each prompt, generated once
and reused every epoch (the same as ``switchkd generate`` followed by SFT)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Dict, List

from switchkd.methods.base import Needs, Source

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config
    from switchkd.rules import Rule


class TeacherSource(Source):
    """The teacher's responses, decoded the first time a prompt is seen and then cached (checkpointed)."""

    name: ClassVar[str] = "teacher"

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        return Needs(teacher=f"method.source={cls.name}")

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """The teacher writes every token (its samples, with ``method.decoding``)."""
        from switchkd.rules import TeacherWrites

        return TeacherWrites()


    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cache: Dict[int, List[int]] = {}

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        idx = batch.index.tolist()
        missing = [i for i, k in enumerate(idx) if k not in self.cache]
        if missing:
            responses = self._across(batch.select(missing)) if self.run.cross is not None else \
                self._rollout(batch.select(missing), self.rule(self.cfg))[0].responses()
            for i, response in zip(missing, responses):
                self.cache[idx[i]] = response
        return batch.with_responses([self.cache[k] for k in idx], self.tok.pad_token_id)

    def _across(self, batch: "Batch") -> List[List[int]]:
        """Across vocabularies: the teacher decodes from its own prompts in its own tokens; each response's text
        is re-tokenized for the student (with the student's EOS where the teacher stopped at its own)."""
        from switchkd.rollout import from_method, rollout

        t_tok, s_tok = self.run.cross.t_tok, self.tok
        mask = batch.teacher_prompt_mask
        ids = batch.teacher_prompt_ids.masked_fill(mask == 0, t_tok.pad_token_id)  # (collated with the student's pad)
        P = ids.shape[1]
        budget = min(self.cfg.method.max_new_tokens, (self.run.cross.max_length or self.cfg.data.max_length) - P)
        rcfg = from_method(self.cfg.method, budget, t_tok, len(t_tok))
        rcfg.seed = self.rng.getrandbits(62)
        out = rollout(None, self.teacher, ids, mask, rcfg, self.rule(self.cfg))
        texts = [t_tok.decode(r, skip_special_tokens=True) for r in out.responses(P)]
        ended = [bool(len(r)) and r[-1] == t_tok.eos_token_id for r in out.responses(P)]
        return [s_tok(t, add_special_tokens=False)["input_ids"] + ([s_tok.eos_token_id] if e else [])
                for t, e in zip(texts, ended)]

    def state_dict(self) -> Dict[str, Any]:
        return super().state_dict() | {"cache": self.cache}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cache = state["cache"]
