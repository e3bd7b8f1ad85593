"""bench/gpu.py runs at tiny shapes on the CPU (--smoke; its rollout part, the TRL step part shares
bench/trl_step.py's code), so the GPU script does not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: make test runs them, make test-fast skips them

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke(shared, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--smoke", "--device", "cpu", "--out", str(tmp_path),
                        "--skip", "train"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = []
    for line in r.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    rows = [x for x in rows if isinstance(x, dict)]
    rollout_rows = [x for x in rows if "batch" in x]
    assert len(rollout_rows) == 4 and all(x["speculative_ms_per_step"] > 0 for x in rollout_rows)
    assert "| batch |" in r.stdout
