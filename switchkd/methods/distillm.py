"""DistiLLM's adaptive off-policy student-generated outputs (Ko et al., ICML 2024; ``source: distillm``),
by the rules of the official ``finetune.py`` (jongwooko/distillm).

``p`` (``--init-threshold``) starts at ``init_student_prob``.  For each batch, with ``u ~ U(0, 1)``
and the fresh-sample threshold ``s`` = ``p * (1 - step / total)`` (``replay_schedule=decreasing``,
the official default), ``p * replay_ratio`` (``constant``) or ``p * step / total`` (``increasing``),
``step`` counted from 1: the batch is generated fresh by the student (and stored in the replay
buffer) when ``u < s``, or when ``u < p`` while the buffer is not yet full (``replay_size``); drawn
from the buffer when ``u < p``; else it is the dataset batch.  The reference dev loss is the
student's cross-entropy on the dev references, measured once before training; at each evaluation
whose dev CE is at least ``loss_eps`` above the reference, ``p`` rises by ``student_prob_step`` (at
most ``max_student_prob``, officially 1.0) and the reference becomes that dev CE.  Evaluations
happen after each epoch on the first ``dev_limit`` (``--dev-num``, 1000) dev examples, the loss being
the mean of per-batch mean CEs, as the official ``evaluate``; ``validate=eval_every`` evaluates at
every ``train.eval_every`` steps on ``eval.limit`` examples instead (token mean).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional

from switchkd.methods.base import Error, Needs, Source, Validation
from switchkd.schema import COUNT, COUNT0, PROB, opt

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config


@dataclass
class DistillmConfig:
    """``method.distillm``: the adaptive off-policy schedule (official finetune.py's flags and defaults)."""

    replay_size: int = opt(1000, "--capacity: the replay buffer's size in sequences", rule=COUNT)
    replay_schedule: str = opt("decreasing", "--replay-ratio: the fresh-sample share of student batches: "
                               "decreasing (p (1 - t/N)), constant (p replay_ratio), increasing (p t/N)",
                               choices=("decreasing", "constant", "increasing"))
    replay_ratio: float = opt(0.5, "the fresh-sample share under replay_schedule=constant", rule=PROB)
    init_student_prob: float = opt(0.0, "--init-threshold: p at the start", rule=PROB)
    max_student_prob: float = opt(1.0, "the most p rises to", rule=PROB)
    student_prob_step: float = opt(0.1, "p's rise when the dev CE has risen by loss_eps", rule=COUNT0)
    loss_eps: float = opt(0.1, "--loss-eps: p rises when the dev CE is >= reference + loss_eps", rule=COUNT0)
    validate: str = opt("epoch", "when the dev CE is measured: after each epoch (official) or at each "
                        "train.eval_every (on eval.limit examples)", choices=("epoch", "eval_every"))
    dev_limit: int = opt(1000, "--dev-num: the dev examples whose CE drives p (the mean of per-batch means, as "
                         "official)", rule=COUNT)


class DistillmSource(Source):
    """Dataset, fresh student or replayed student batches (see the module docstring)."""

    name: ClassVar[str] = "distillm"
    section: ClassVar[Optional[str]] = "distillm"
    Section: ClassVar[Optional[type]] = DistillmConfig

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        return Needs(vllm=None)  # its rollouts are the student's own samples

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        if not cfg.data.dev:
            raise error("config error: method.source=distillm needs data.dev: its student-data probability rises "
                        "only when the dev loss does (set data.dev; it is measured after each epoch, or at each "
                        "train.eval_every with method.distillm.validate=eval_every)")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        m = self.settings
        # the student's CE on the dev references, measured once before training (the reference); official finetune.py:
        # evaluate() after each epoch over --dev-num examples, the mean of per-batch means
        self.validation = (Validation("cross_entropy", "epoch", m.dev_limit, batch_mean=True, reference=True)
                           if m.validate == "epoch" else Validation("cross_entropy", reference=True))
        self.p = m.init_student_prob
        self.buffer: deque = deque(maxlen=m.replay_size)
        self.reference: Optional[float] = None
        self.counts = {"dataset": 0, "fresh": 0, "replay": 0}

    def decide(self, u: float, step: int) -> str:
        """``dataset``, ``fresh`` or ``replay`` for a draw ``u`` at optimizer step ``step`` (0-based)."""
        m, frac = self.settings, min(1.0, (step + 1) / max(self.run.total_steps, 1))
        s = {"decreasing": self.p * (1 - frac), "constant": self.p * m.replay_ratio,
             "increasing": self.p * frac}[m.replay_schedule]
        if u < s or (u < self.p and len(self.buffer) < m.replay_size):
            return "fresh"
        return "replay" if u < self.p else "dataset"

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        from switchkd.batch import Batch

        n = batch.size
        choice = self.decide(self.shared.random(), step)
        if choice == "replay" and len(self.buffer) < n:
            choice = "fresh"  # only when replay_size < batch size
        self.counts[choice] += 1
        if choice == "dataset":
            return batch
        if choice == "replay":
            rows = self.rng.sample(list(self.buffer), n)
            new = Batch.build([r[0] for r in rows], [r[1] for r in rows], self.tok.pad_token_id, [r[2] for r in rows],
                              [r[3] for r in rows] if rows[0][3] is not None else None)
            return new.to(batch.device)
        new, _ = self._rollout(batch, self.rule(self.cfg))
        prompts, t_prompts = new.prompts(), new.teacher_prompts()
        for i, response in enumerate(new.responses()):
            self.buffer.append((prompts[i], response, int(new.index[i]), t_prompts[i] if t_prompts else None))
        return new

    def on_validation(self, dev_loss: float) -> None:
        """The first call sets the reference (the evaluation before training); later ones may raise p."""
        m = self.settings
        if self.reference is None:
            self.reference = dev_loss
        elif dev_loss >= self.reference + m.loss_eps:
            self.p = min(self.p + m.student_prob_step, m.max_student_prob)
            self.reference = dev_loss

    def stats(self) -> Dict[str, float]:
        out = {"distillm/student_prob": self.p, **{f"distillm/{k}_batches": v for k, v in self.counts.items()}}
        if self.reference is not None:
            out["distillm/reference_dev_ce"] = self.reference
        self.counts = dict.fromkeys(self.counts, 0)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return super().state_dict() | {"p": self.p, "buffer": list(self.buffer), "reference": self.reference}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.p, self.reference = state["p"], state.get("reference")
        self.buffer.extend(state["buffer"])
