"""tau0 calibration by bisection on the measured teacher share."""

from __future__ import annotations

from dataclasses import replace

import pytest
from engine_spec import spec

from switchkd.calibrate import calibrate_tau0, teacher_share


@pytest.mark.parametrize("target", [0.1, 0.5])
def test_calibrated_tau0_gives_the_target_share(target):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rollout import _pair

    student, teacher, tok, ids, mask = _pair("llama")
    cfg = spec(source="switch", max_new_tokens=24, do_sample=False, decay=0.05, speculative=True)
    tau0, share = calibrate_tau0(student, teacher, ids, mask, *cfg, target)
    assert abs(share - target) < 0.08
    assert teacher_share(student, teacher, ids, mask, cfg[0], replace(cfg[1], tau0=tau0)) == share
    with pytest.raises(ValueError):
        calibrate_tau0(student, teacher, ids, mask, *cfg, 1.5)


def test_calibrate_cli_and_presets(capsys):
    from switchkd.cli import main

    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert "tiny/switch" in names and "gpt2-xl_to_gpt2/distillm" in names and not any("accelerate" in n for n in names)
    assert main(["calibrate", "tiny/switch", "method.max_new_tokens=16", "data.synthetic_size=16", "--target", "0.5",
                 "--limit", "4", "--batch-size", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("method.switch.tau0=") and "measured teacher share" in line
    share = float(line.split("measured teacher share ")[1].split(",")[0])
    assert 0.2 < share < 0.8
    assert main(["calibrate", "tiny/switch", "--target", "1.5"]) == 2


def test_calibrate_stops_at_the_first_share_within_tolerance_and_logs_every_round(capsys):
    """The CLI logs one line per measured round with its share, and the search ends at the first round whose share
    is within --tolerance of the target (counted, not timed); a tolerance of 0.49 ends it at the first round."""
    import re

    from switchkd.cli import main

    common = ["calibrate", "tiny/switch", "method.max_new_tokens=16", "data.synthetic_size=16", "--target", "0.5",
              "--limit", "4", "--batch-size", "4"]
    assert main([*common, "--tolerance", "0.05"]) == 0
    captured = capsys.readouterr()
    rounds = re.findall(r"calibrate: round (\d+): tau0 \S+ -> teacher share ([\d.]+)", captured.err)
    shares = [float(s) for _, s in rounds]
    assert [int(r) for r, _ in rounds] == list(range(1, len(rounds) + 1))
    assert abs(shares[-1] - 0.5) <= 0.05 and all(abs(s - 0.5) > 0.05 for s in shares[:-1])
    assert f"measured teacher share {shares[-1]:.3f}" in captured.out
    assert main([*common, "--tolerance", "0.49"]) == 0
    assert capsys.readouterr().err.count("calibrate: round") == 1
    assert main([*common, "--tolerance", "0.7"]) == 2
    assert "--tolerance 0.7" in capsys.readouterr().err
