"""The base of every sequence source: what a method declares and the helpers sources share.

A method is one module of this package: a :class:`Source` subclass that says which sequences a
training batch holds, declares its config section (a dataclass of :func:`switchkd.schema.opt` fields,
``cfg.method.<section>``), its cross-field rules, whether it needs a teacher, its rollouts for a whole
optimizer step, its train/eval-mode (dropout) policy, its extra per-token terms, its checkpointable
state and its dev metric.  Nothing outside the method's module depends on its name.

Imports nothing heavy at module level, so that a config is checked before torch loads; the engine
and the batch code are imported when a source first decodes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterator, List, Optional

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config
    from switchkd.decoding import RolloutOutput
    from switchkd.rules import Rule

Error = Callable[[str], Exception]


class Source:
    """Ground-truth responses, unchanged (SFT, word-level KD, BiLD): the base every source extends."""

    #: ``method.source`` value that selects this class
    name: ClassVar[str] = "dataset"
    #: the method's own config section (``cfg.method.<section>``) and its dataclass, or None
    section: ClassVar[Optional[str]] = None
    Section: ClassVar[Optional[type]] = None
    #: whether it decodes during training (such runs are slower: the demo starts them first)
    decodes: ClassVar[bool] = False
    #: whether its schedule reads the dev loss (``on_validation``): such runs need dev evaluations
    reads_dev_loss: ClassVar[bool] = False
    #: whether it logs the teacher-written share by position (``<prefix>/teacher_frac@...``)
    profiles_teacher_share: ClassVar[bool] = False
    #: whether the teacher's logits may come from ``method.teacher_cache`` (sequences fixed in advance)
    fixed_sequences: ClassVar[bool] = False
    #: train the student with dropout on (False: eval mode during the update too, as RL-style methods do)
    dropout = True
    dev_metric = "objective"  # what on_validation receives: the training objective on dev, or "cross_entropy"
    validation = "eval_every"  # when on_validation is called: at train.eval_every steps, or after each "epoch"
    dev_limit: Optional[int] = None  # on_validation's own dev set (the first N of data.dev; None: eval.limit's)
    dev_batch_mean = False  # on_validation's loss: the mean of per-batch means (True) or of all tokens
    total_steps = 1  # optimizer steps of the run (set by the trainer; schedules read it)
    cross: Any = None  # a teacher of another vocabulary: the run's switchkd.cross.CrossView (set by the trainer)
    sharded = False  # set by the trainer under FSDP / ZeRO-3: rollouts are collective

    # -- declarations read while the config is checked (class level, no models) --
    @classmethod
    def teacher_reason(cls, cfg: "Config") -> Optional[str]:
        """Why this source needs a teacher model whatever the loss (None: only if the loss does)."""
        return None

    @classmethod
    def cross_tokenizer_reason(cls, cfg: "Config") -> Optional[str]:
        """Why this source cannot distil from a teacher with another vocabulary (None: it can, its rollouts
        never run the teacher, whose view of the text is built by :class:`switchkd.cross.CrossView`)."""
        return None

    @classmethod
    def served_teacher_reason(cls, cfg: "Config") -> Optional[str]:
        """Why this source cannot work with a teacher on a vLLM server (``teacher.server``: top-k log-probabilities
        of whole sequences and the server's samples, no per-step teacher), or None."""
        return None

    @classmethod
    def vllm_reason(cls, cfg: "Config") -> Optional[str]:
        """Why this source's rollouts cannot come from a vLLM engine holding the student
        (``method.decoding.engine=vllm``), or None.  The base class decodes nothing."""
        return "decodes no student rollouts"

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        """Cross-field rules of this source; raise ``error(message)`` at the first broken one."""

    # -- the run --
    def __init__(self, cfg: "Config", student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int,
                 unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0) -> None:
        self.cfg, self.student, self.teacher, self.tok, self.vocab = cfg, student, teacher, tokenizer, vocab
        self.unwrap, self.rng = unwrap, random.Random(seed)
        # per-batch choices (rollout or not) draw from an RNG that every process seeds alike, so that with
        # sharded models (collective forwards) all processes roll out together; row-level draws use ``rng``
        self.shared = random.Random(cfg.train.seed * 1000 + 999)

    @property
    def settings(self) -> Any:
        """This source's config section (``cfg.method.<section>``)."""
        return getattr(self.cfg.method, self.section) if self.section else None

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        """The batch the loss sees for one dataset micro-batch at optimizer step ``step`` (0-based)."""
        return batch

    def step_batches(self, batches: Iterator["Batch"], step: int, n: int) -> List["Batch"]:
        """The ``n`` micro-batches of one optimizer step, drawn from ``batches`` (the trainer's iterator)."""
        return [self(next(batches), step) for _ in range(n)]

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """Who writes the tokens of this source's two-model rollouts (:mod:`switchkd.rules`); the base: the student."""
        from switchkd.rules import StudentWrites

        return StudentWrites()

    @classmethod
    def engine_settings(cls, cfg: "Config") -> Dict[str, Any]:
        """This source's :class:`switchkd.decoding.RolloutConfig` fields beyond the ``method`` section's shared ones
        (:func:`switchkd.rollout.from_method`), e.g. draft-and-verify's."""
        return {}

    def stats(self) -> Dict[str, float]:
        """Diagnostics to log since the last call."""
        return {}

    def wants_reference(self) -> bool:
        """Whether ``on_validation`` should also be called once before the first step (a reference loss)."""
        return False

    def on_validation(self, dev_loss: float) -> None:
        """Called with the dev loss (``dev_metric``) at each evaluation."""

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
            self._vocabs = (Vocab(self.cross.s_tok, self.cross.s_table), Vocab(self.cross.t_tok, self.cross.t_table))
        P = batch.prompt_ids.shape[1]
        rcfg = from_method(self.cfg.method, min(self.cfg.method.max_new_tokens, self.cfg.data.max_length - P),
                           self.tok, self.vocab, **self.engine_settings(self.cfg))
        rcfg.seed = self.rng.getrandbits(62)
        t_mask = batch.teacher_prompt_mask
        t_ids = batch.teacher_prompt_ids.masked_fill(t_mask == 0, self.cross.t_tok.pad_token_id or 0)
        student = self.unwrap(self.student)
        was_training = student.training
        student.eval()
        out = cross_switch(student, self.teacher, batch.prompt_ids, batch.prompt_mask, t_ids, t_mask, rcfg, rule,
                           *self._vocabs, shared=(self.cross.s_matched, self.cross.t_matched),
                           t_max_len=self.cross.max_length)
        student.train(was_training)
        return batch.with_responses(out.responses(P), self.tok.pad_token_id), out
