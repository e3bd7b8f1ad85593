"""ImitKD (Lin et al., EMNLP Findings 2020; ``source: imitkd``), by the official code's rules
(asappresearch/imitkd).

Each sequence's response is the dataset's with probability beta, else the student's greedy decoding
of the prompt (the student's own prefix).  beta anneals from 1 (all dataset) at the first step:
``exponential`` ``base^(-t/N)`` as every official config (base 200 for translation, 10 for
summarisation), or ``linear`` to 0 at the last step.  Targets: ``full`` ("ImitKD+Full" in the paper)
keeps the sequences for the method's divergence to the teacher's distributions on every row;
``argmax`` ("ImitKD") relabels the student rows with the teacher's argmax token at each position and
keeps the gold tokens on dataset rows (trained by cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional

from switchkd.methods.base import Error, Needs, Source
from switchkd.schema import gt, opt

if TYPE_CHECKING:
    from torch import Tensor

    from switchkd.batch import Batch
    from switchkd.config import Config


@dataclass
class ImitkdConfig:
    """``method.imitkd``: ImitKD's schedule and targets."""

    schedule: str = opt("exponential", "beta_t = base^(-t/N) (exponential, every official config) or 1 - t/(N-1) "
                        "(linear): the probability of the dataset's response at step t of N",
                        choices=("exponential", "linear"))
    base: float = opt(200.0, "the exponential schedule's base: 200 in the translation configs, 10 in the "
                      "summarisation ones", rule=gt(1))
    targets: str = opt("full", "full (\"ImitKD+Full\": the method's divergence to the teacher on every row) or "
                       "argmax (\"ImitKD\": CE on the teacher's argmax tokens; needs divergence ce)",
                       choices=("full", "argmax"))


class ImitkdSource(Source):
    """Dataset rows with probability beta, else student-prefixed rows (see the module docstring)."""

    name: ClassVar[str] = "imitkd"
    section: ClassVar[Optional[str]] = "imitkd"
    Section: ClassVar[Optional[type]] = ImitkdConfig

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        argmax = cfg.method.imitkd.targets == "argmax"
        return Needs(teacher="method.imitkd.targets=argmax" if argmax else None,
                     across_vocabularies="targets=argmax labels the student's rows with the teacher's tokens"
                     if argmax else None,
                     vllm=None)  # its rollouts are the student's own samples

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        m = cfg.method
        if m.imitkd.targets != "argmax":
            return
        if m.divergence != "ce" and m.kd_ratio > 0:
            raise error("config error: method.imitkd.targets=argmax (the paper's ImitKD) trains by cross-entropy on "
                        "the teacher's argmax tokens: set method.divergence=ce (or method.kd_ratio=0)")
        if m.priming != "none":
            raise error("config error: method.imitkd.targets=argmax labels the student's own sequences with the "
                        "teacher's argmax; it works with method.priming=none")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.counts = {"dataset_rows": 0, "student_rows": 0}

    def beta(self, step: int) -> float:
        """Probability of the dataset response at optimizer step ``step`` (0-based)."""
        m = self.settings
        if m.schedule == "exponential":
            return m.base ** (-step / max(self.run.total_steps, 1))
        return max(0.0, 1.0 - step / max(self.run.total_steps - 1, 1))

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        from switchkd.distributed import all_ranks

        b = self.beta(step)
        rows = [i for i in range(batch.size) if self.rng.random() >= b]
        self.counts["student_rows"] += len(rows)
        self.counts["dataset_rows"] += batch.size - len(rows)
        anyone = not all_ranks(not rows, batch.device) if self.run.sharded else bool(rows)  # collective
        if not anyone:
            return batch
        # (sharded: a process with no student rows still decodes one, discarded, while another process decodes)
        gen, _ = self._rollout(batch.select(rows or [0]), self.rule(self.cfg), greedy=True)
        if not rows:
            return batch
        responses = batch.responses()
        for j, response in zip(rows, gen.responses()):
            responses[j] = response
        new = batch.with_responses(responses, self.tok.pad_token_id)
        if self.settings.targets == "argmax":
            new.labels = self.argmax_labels(new, rows)
        return new

    def argmax_labels(self, batch: "Batch", rows: List[int]) -> "Tensor":
        """``labels [B, T]`` with each response token of ``rows`` replaced by the teacher's argmax at that
        position given the (student's) prefix; other rows keep their gold tokens."""
        import torch

        labels = batch.labels.clone()
        if not rows:
            return labels
        idx = torch.tensor(rows, device=labels.device)
        sub = labels[idx]
        keep = sub[:, 1:] != -100
        if getattr(self.teacher, "served", False):  # a served teacher: the first of its top k at each response token
            top = self.teacher.targets(batch.select(rows), self.vocab)
            sub[:, 1:][keep] = top.ids[:, 0].to(sub.device)
            labels[idx] = sub
            return labels
        with torch.no_grad():
            logits = self.teacher(batch.input_ids[idx], attention_mask=batch.attention_mask[idx]).logits
        pred = logits[:, :, : self.vocab].argmax(-1)  # [b, T] next tokens
        sub[:, 1:] = torch.where(keep, pred[:, :-1], sub[:, 1:])
        labels[idx] = sub
        return labels

    def stats(self) -> Dict[str, float]:
        out = {f"imitkd/{k}": v for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out
