"""The base of every sequence source: what a method declares and the helpers sources share.

A method is one module of this package: a :class:`Source` subclass that says which sequences a
training batch holds, declares its config section (a dataclass of :func:`switchkd.schema.opt` fields,
``cfg.method.<section>``), its cross-field rules, what it needs (:class:`Needs`), who writes its rollouts' tokens
(a :mod:`switchkd.rules` rule), its batches for a whole optimizer step, its train/eval-mode (dropout) policy, its
checkpointable state and its own dev evaluation (:class:`Validation`).  Nothing outside the method's module depends
on its name.

Imports nothing heavy at module level, so that a config is checked before torch loads; the engine
and the batch code are imported when a source first decodes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterator, List, Optional

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config
    from switchkd.decoding import RolloutOutput
    from switchkd.rules import Rule

Error = Callable[[str], Exception]


@dataclass(frozen=True)
class Needs:
    """What a source needs, or cannot work with, under one config: each a reason in words, None when it does not.

    Read while the config is checked (before any model loads) and when the run's teacher is known.
    """

    teacher: Optional[str] = None  # why it needs a teacher model whatever the loss
    across_vocabularies: Optional[str] = None  # why it cannot distil from a teacher with another vocabulary
    served_teacher: Optional[str] = None  # why it cannot work with a teacher on a vLLM server (teacher.server)
    vllm: Optional[str] = "decodes no student rollouts"  # why its rollouts cannot come from vLLM (decoding.engine)
    teacher_cache: Optional[str] = "makes new sequences"  # why the teacher's targets cannot come from method.teacher_cache


@dataclass(frozen=True)
class Validation:
    """A source's own dev evaluation, whose value it reads through :meth:`Source.on_validation` (DistiLLM's schedule).

    Attributes:
        metric: ``objective`` (the training objective on the dev references) or ``cross_entropy`` (the student's).
        when: ``eval_every`` (with each dev evaluation) or ``epoch`` (after each epoch).
        limit: the first N dev examples form its own dev set (None: the dev evaluation's).
        batch_mean: the value is the mean of per-batch means (else of all tokens).
        reference: also measured once before the first step while :meth:`Source.on_validation` has not been called.
    """

    metric: str = "objective"
    when: str = "eval_every"
    limit: Optional[int] = None
    batch_mean: bool = False
    reference: bool = False


@dataclass(frozen=True)
class Run:
    """What the trainer tells a source about the run: optimizer steps, the cross-vocabulary view, sharding."""

    total_steps: int = 1  # optimizer steps of the run (schedules read it)
    cross: Any = None  # a teacher of another vocabulary: the run's switchkd.cross.CrossView
    sharded: bool = False  # FSDP / ZeRO-3: rollouts are collective


class Source:
    """The base of every sequence source (the dataset's responses, unchanged: :mod:`switchkd.methods.dataset`)."""

    #: ``method.source`` value that selects the class
    name: ClassVar[str] = ""
    #: the method's own config section (``cfg.method.<section>``) and its dataclass, or None
    section: ClassVar[Optional[str]] = None
    Section: ClassVar[Optional[type]] = None
    #: train the student with dropout on (False: eval mode during the update too, as RL-style methods do)
    dropout: ClassVar[bool] = True
    #: its own dev evaluation (None: it reads none)
    validation: Optional[Validation] = None

    # -- declarations read while the config is checked (class level, no models) --
    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        """What this source needs or cannot work with under ``cfg``."""
        return Needs()

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        """Cross-field rules of this source; raise ``error(message)`` at the first broken one."""

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """Who writes the tokens of this source's rollouts (:mod:`switchkd.rules`); the base: the student."""
        from switchkd.rules import StudentWrites

        return StudentWrites()

    @classmethod
    def engine_settings(cls, cfg: "Config") -> Dict[str, Any]:
        """This source's :class:`switchkd.decoding.RolloutConfig` fields beyond the ``method`` section's shared ones
        (:func:`switchkd.rollout.from_method`), e.g. draft-and-verify's."""
        return {}

    # -- the run --
    def __init__(self, cfg: "Config", student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int,
                 unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0, run: Optional[Run] = None) -> None:
        self.cfg, self.student, self.teacher, self.tok, self.vocab = cfg, student, teacher, tokenizer, vocab
        self.unwrap, self.rng, self.run = unwrap, random.Random(seed), run or Run()
        self.settings = getattr(cfg.method, self.section) if self.section else None  # cfg.method.<section>
        # per-batch choices (rollout or not) draw from an RNG that every process seeds alike, so that with
        # sharded models (collective forwards) all processes roll out together; row-level draws use ``rng``
        self.shared = random.Random(cfg.train.seed * 1000 + 999)

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        """The batch the loss sees for one dataset micro-batch at optimizer step ``step`` (0-based)."""
        return batch

    def step_batches(self, batches: Iterator["Batch"], step: int, n: int) -> List["Batch"]:
        """The ``n`` micro-batches of one optimizer step, drawn from ``batches`` (the trainer's iterator)."""
        return [self(next(batches), step) for _ in range(n)]

    def stats(self) -> Dict[str, float]:
        """Diagnostics to log since the last call."""
        return {}

    def on_validation(self, value: float) -> None:
        """Called with its own dev evaluation's value (:attr:`validation`)."""

    def close(self) -> None:
        """Release what the source started (its vLLM engine) while the run's process group still exists: the
        trainer calls it once training is over, before accelerate ends the run."""
        if getattr(self, "_vllm", None) is not None:
            self._vllm.close()
            self._vllm = None

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.getstate(), "shared": self.shared.getstate()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        if "shared" in state:
            self.shared.setstate(state["shared"])

    def _rollout(self, batch: "Batch", rule: "Rule", keep_teacher: bool = False,
                 greedy: bool = False) -> "tuple[Batch, Optional[RolloutOutput]]":
        """Decode responses for the batch's prompts, the writer of each token chosen by ``rule`` (``greedy``: argmax
        whatever ``method.decoding.do_sample``), and rebuild the batch around them (``teacher_selected``: the
        teacher's logits at the response tokens, with ``keep_teacher``)."""
        from switchkd.rollout import from_method, rollout

        P = batch.prompt_ids.shape[1]
        budget = max(1, min(self.cfg.method.max_new_tokens, self.cfg.data.max_length - P))
        engine = self.cfg.method.decoding.engine
        if not rule.uses_student and getattr(self.teacher, "served", False):  # the teacher's server samples
            prompts = batch.teacher_prompts() or batch.prompts()
            responses = self.teacher.sample(prompts, budget, self.cfg.method.decoding, self.tok.eos_token_id,
                                            seed=self.rng.getrandbits(31))
            return batch.with_responses(responses, self.tok.pad_token_id), None
        if not rule.uses_teacher and engine == "vllm":  # a vLLM engine holding the student
            return batch.with_responses(self._vllm_sample(batch.prompts(), budget, greedy), self.tok.pad_token_id), None
        rcfg = from_method(self.cfg.method, budget, self.tok, self.vocab, keep_teacher, **self.engine_settings(self.cfg))
        rcfg.seed = self.rng.getrandbits(62)  # sampling from the source's own (checkpointed) RNG: resumes exactly
        rcfg.do_sample = rcfg.do_sample and not greedy
        student = self.unwrap(self.student)
        was_training = student.training
        student.eval()
        if engine == "vllm" and rule.uses_student and rule.uses_teacher:  # vLLM drafts, in-process/served verification
            from switchkd.drafted import drafted_rollout

            out = drafted_rollout(self._vllm_engine(), student, self.teacher, batch.prompt_ids, batch.prompt_mask, rcfg,
                                  rule, batch.teacher_prompt_ids, batch.teacher_prompt_mask)
        else:
            out = rollout(student, self.teacher, batch.prompt_ids, batch.prompt_mask, rcfg, rule,
                          batch.teacher_prompt_ids, batch.teacher_prompt_mask)
        student.train(was_training)
        new = batch.with_responses(out.responses(P), self.tok.pad_token_id)
        if keep_teacher and out.teacher_logits is not None:  # (a served teacher's targets are fetched by the loss)
            new.teacher_selected = out.teacher_logits[out.response_mask]
        return new, out

    def _vllm_sample(self, prompts: "List[List[int]]", budget: int, greedy: bool) -> "List[List[int]]":
        """The student's responses to ``prompts`` from its vLLM engine (:mod:`switchkd.vllm_engine`), built on first
        use and given the student's current weights before each rollout."""
        return self._vllm_engine().sample(prompts, budget, self.cfg.method.decoding, self.tok.eos_token_id,
                                          seed=self.rng.getrandbits(62), greedy=greedy)

    def _vllm_engine(self) -> Any:
        """The student's :class:`switchkd.vllm_engine.VLLMStudent`, built on first use."""
        from switchkd.vllm_engine import VLLMStudent

        if getattr(self, "_vllm", None) is None:
            self._vllm = VLLMStudent(self.unwrap(self.student), self.tok, self.cfg.data.max_length,
                                     seed=self.cfg.train.seed)
        return self._vllm

    def _interleaved(self, batch: "Batch", rule: "Rule") -> "tuple[Batch, RolloutOutput]":
        """Across vocabularies (:mod:`switchkd.interleave`): two-writer rollouts by ``rule`` (a gate compares the two
        distributions by its ``cross`` comparison; a mixture draws the writer of each step), both models reading the
        text in their own tokens; the teacher's spans re-tokenized into the student's sequence."""
        from switchkd.interleave import Vocab, cross_switch
        from switchkd.rollout import from_method
        from switchkd.sections import ConfigError

        if self.cfg.method.decoding.engine == "vllm":
            raise ConfigError(f"method.decoding.engine=vllm: method.source={self.cfg.method.source} decodes across "
                              "vocabularies with both models in the process; use method.decoding.engine=switchkd")

        if getattr(self, "_vocabs", None) is None:
            self._vocabs = (Vocab(self.run.cross.s_tok, self.run.cross.s_table), Vocab(self.run.cross.t_tok, self.run.cross.t_table))
        P = batch.prompt_ids.shape[1]
        rcfg = from_method(self.cfg.method, min(self.cfg.method.max_new_tokens, self.cfg.data.max_length - P),
                           self.tok, self.vocab, **self.engine_settings(self.cfg))
        rcfg.seed = self.rng.getrandbits(62)
        t_mask = batch.teacher_prompt_mask
        t_ids = batch.teacher_prompt_ids.masked_fill(t_mask == 0, self.run.cross.t_tok.pad_token_id or 0)
        student = self.unwrap(self.student)
        was_training = student.training
        student.eval()
        out = cross_switch(student, self.teacher, batch.prompt_ids, batch.prompt_mask, t_ids, t_mask, rcfg, rule,
                           *self._vocabs, shared=(self.run.cross.s_matched, self.run.cross.t_matched),
                           t_max_len=self.run.cross.max_length)
        student.train(was_training)
        return batch.with_responses(out.responses(P), self.tok.pad_token_id), out
