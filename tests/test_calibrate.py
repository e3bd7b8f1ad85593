"""tau0 calibration by bisection on the measured teacher share."""

from __future__ import annotations

import pytest

from switchkd.calibrate import calibrate_tau0, teacher_share
from switchkd.rollout import RolloutConfig


@pytest.mark.parametrize("target", [0.1, 0.5])
def test_calibrated_tau0_gives_the_target_share(target):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rollout import _pair

    student, teacher, tok, ids, mask = _pair("llama")
    cfg = RolloutConfig(source="switch", max_new_tokens=24, do_sample=False, decay=0.05, speculative=True)
    tau0, share = calibrate_tau0(student, teacher, ids, mask, cfg, target)
    assert abs(share - target) < 0.08
    assert teacher_share(student, teacher, ids, mask, RolloutConfig(**{**cfg.__dict__, "tau0": tau0})) == share
    with pytest.raises(ValueError):
        calibrate_tau0(student, teacher, ids, mask, cfg, 1.5)
