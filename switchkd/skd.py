"""SKD, Speculative Knowledge Distillation (Xu et al., ICLR 2025), as a sequence source.

Algorithm 1 of the paper: the student samples each response token y_i; when y_i is not among the
teacher's top K tokens at that position, the teacher's own sample replaces it; the student is then
trained by a divergence D(teacher || student) on these sequences (``method.divergence``).  K =
``method.skd.top_k`` (25 in the paper).

This is SWITCH's interleaved decoding with another rule, so it runs through the same engine and the
same decision code (:func:`switchkd.decoding.switch_gate`): the ``rank`` token gate (the proposal's
rank under the teacher, 0 for its argmax) against a constant threshold K - 1/2, in the lockstep loop and
in the draft-and-verify loop alike (a student draft is an SKD proposal; the first rejected one is
replaced by a teacher sample).  Diagnostics are logged under ``skd/`` (teacher share by position, mean
rank).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from switchkd.sources import SwitchSource


class SkdSource(SwitchSource):
    """SKD sequences (with probability ``method.switch.ratio``, else dataset batches)."""

    prefix = "skd"
    warn_saturation = False  # a teacher share near 0 or 1 is SKD's own schedule, not a mis-set threshold

    def rollout_config(self, rcfg: Any) -> Any:
        return replace(rcfg, gate="rank", schedule="const", tau0=self.cfg.method.skd.top_k - 0.5)
