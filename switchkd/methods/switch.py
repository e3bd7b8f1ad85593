"""SWITCH (Koo et al., NAACL Findings 2025; ``source: switch``): the student writes the response and the
teacher takes over each token where the two models disagree.

At response position t both models see the same prefix; with p_t the teacher's and q_t the student's
next-token distributions, the gate d_t = gate(p_t, q_t) (``jsd`` by default) is compared with
tau_t = tau0 e^(-decay t) (``schedule``); where d_t > tau_t the teacher writes the token.  A batch is
SWITCH-generated with probability ``ratio``, else the dataset's.  The teacher logits the rollout
computed are kept as the loss targets (no second teacher forward).  Diagnostics: the share of
teacher-written tokens overall and by position bucket, the mean gate by position, and a warning when
the share is saturated.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional

from switchkd.methods.base import Error, Needs, Source
from switchkd.schema import COUNT, COUNT0, PROB, opt

if TYPE_CHECKING:
    from switchkd.batch import Batch
    from switchkd.config import Config
    from switchkd.decoding import RolloutOutput
    from switchkd.rules import Rule

BUCKETS = (0, 8, 16, 32, 64, 128, 256)  # response positions of the logged teacher share
TAU0 = ((lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and not math.isnan(v)),
        "a number >= 0 (inf: the teacher never writes)")


@dataclass
class SwitchConfig:
    """``method.switch``: the teacher writes where gate(p, q) > tau_t, tau_t = tau0 exp(-decay t)."""

    tau0: float = opt(0.1, "the threshold at the first response token (switchkd calibrate finds one)", rule=TAU0)
    decay: float = opt(0.1, "lambda: the threshold's decay per response token", rule=COUNT0)
    schedule: str = opt("exp", "tau_t: tau0 exp(-decay t) (exp), tau0 max(0, 1 - decay t) (linear), tau0 (const)",
                        choices=("exp", "linear", "const"))
    gate: str = opt("jsd", "the divergence compared with tau_t: Jensen-Shannon (jsd), forward/reverse KL, total "
                    "variation", choices=("jsd", "fkl", "rkl", "tvd"))
    ratio: float = opt(1.0, "the probability that a batch is SWITCH-generated, else the dataset's", rule=PROB)
    speculative: bool = opt(True, "rollouts by draft-and-verify (the same tokens as lockstep in fp32 greedy)")
    draft_k: int = opt(4, "the first draft length; later ones from the measured rejection rate", rule=COUNT)
    max_draft_k: int = opt(16, "the longest draft (>= draft_k)", rule=COUNT)
    cross_gate: str = opt("shared", "across vocabularies, what the gate compares: the distributions over the tokens "
                          "both vocabularies share (shared), the two next-byte distributions (byte), or ULD's "
                          "sorted-probability distance (sorted)", choices=("shared", "byte", "sorted"))


def saturation_warning(share: float, tokens: int, tau0: float) -> Optional[str]:
    """The message for a logging window whose teacher share is saturated (>= 0.95 or <= 0.05), else None:
    SWITCH then degenerates into SeqKD-like (teacher writes all) or on-policy (student writes all) data."""
    if 0.05 < share < 0.95:
        return None
    who, fix = (("the teacher", "raise method.switch.tau0, or start from an SFT-fine-tuned student")
                if share >= 0.95 else ("the student", "lower method.switch.tau0"))
    return (f"SWITCH: {who} wrote {100 * share:.0f}% of the last {tokens} response tokens (tau0 {tau0:g}): the gate "
            f"is saturated; {fix}, or find tau0 with switchkd calibrate CONFIG --target 0.53")


class SwitchSource(Source):
    """SWITCH sequences (with probability ``method.switch.ratio``, else dataset batches)."""

    name: ClassVar[str] = "switch"
    section: ClassVar[Optional[str]] = "switch"
    Section: ClassVar[Optional[type]] = SwitchConfig
    prefix = "switch"  # of the logged diagnostics
    warn_saturation = True

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        served = None if cfg.method.decoding.engine == "vllm" else (
            "the gate needs the teacher at every drafted block; set method.decoding.engine=vllm (vLLM drafts, the gate "
            "over the served top-k and tail) or load the teacher in the process")
        return Needs(teacher=f"method.source={cls.name}", served_teacher=served,
                     vllm=None)  # vLLM drafts, decided by switchkd.drafted

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        sw = cfg.method.switch
        if sw.max_draft_k < sw.draft_k:
            raise error(f"config error: method.switch.max_draft_k={sw.max_draft_k} is smaller than "
                        f"method.switch.draft_k={sw.draft_k}")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._reset()

    def _reset(self) -> None:
        k = len(BUCKETS)
        self.n, self.teacher_n, self.gate_sum = [0.0] * k, [0.0] * k, [0.0] * k

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """SWITCH's gate from ``method.switch`` (:class:`switchkd.rules.Gate`)."""
        from switchkd.rules import Gate

        sw = cfg.method.switch
        return Gate(tau0=sw.tau0, decay=sw.decay, schedule=sw.schedule, divergence=sw.gate, cross=sw.cross_gate)

    @classmethod
    def engine_settings(cls, cfg: "Config") -> Dict[str, Any]:
        sw = cfg.method.switch
        return {"speculative": sw.speculative, "draft_k": sw.draft_k, "max_draft_k": sw.max_draft_k}

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        import torch

        if self.shared.random() >= self.cfg.method.switch.ratio:
            return batch
        new, out = self._across(batch) if self.run.cross is not None else self._rollout(batch, self.rule(self.cfg), keep_teacher=True)
        mask = out.response_mask
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask]
        bucket = torch.bucketize(pos, torch.tensor(BUCKETS[1:], device=pos.device), right=True).cpu()
        k = len(BUCKETS)
        for acc, w in ((self.n, None), (self.teacher_n, out.from_teacher[mask].float().cpu()),
                       (self.gate_sum, out.gate[mask].float().cpu())):
            for i, v in enumerate(torch.bincount(bucket, weights=w, minlength=k).tolist()):
                acc[i] += v
        return new

    def _across(self, batch: "Batch") -> "tuple[Batch, RolloutOutput]":
        return self._interleaved(batch, self.rule(self.cfg))

    def stats(self) -> Dict[str, float]:
        total = sum(self.n)
        if total == 0:
            return {}
        p = self.prefix
        out = {f"{p}/teacher_frac": sum(self.teacher_n) / total}
        warning = saturation_warning(out[f"{p}/teacher_frac"], int(total), self.cfg.method.switch.tau0) \
            if self.warn_saturation else None
        if warning:
            print(f"switchkd: warning: {warning}", file=sys.stderr)
        for i, lo in enumerate(BUCKETS):
            if self.n[i] > 0:
                name = f"{lo}-{BUCKETS[i + 1] - 1}" if i + 1 < len(BUCKETS) else f"{lo}+"
                out[f"{p}/teacher_frac@{name}"] = self.teacher_n[i] / self.n[i]
                out[f"{p}/gate@{name}"] = self.gate_sum[i] / self.n[i]
        self._reset()
        return out
