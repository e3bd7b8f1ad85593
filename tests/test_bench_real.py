"""bench/real.py's statistics (bench/real_report.py): the paired interval that decides SWITCH minus each method."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

# loaded from its file: bench/ on sys.path would let bench/vllm.py shadow the vllm package for the other tests
_spec = importlib.util.spec_from_file_location("bench_real_report",
                                              Path(__file__).resolve().parents[1] / "bench" / "real_report.py")
_report = sys.modules["bench_real_report"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_report)
paired = _report.paired

# Student's t 0.975 quantiles (tables): degrees of freedom -> quantile
T975 = {9: 2.262157, 29: 2.045230, 99: 1.984217, 299: 1.967903}


@pytest.mark.parametrize("df", sorted(T975))
def test_paired_interval_is_the_t_interval_of_the_prompt_differences(df):
    n = df + 1
    a = [[math.sin(i) * 3 + 0.4 for i in range(n)], [math.sin(i) * 3 + 0.6 for i in range(n)]]  # two training seeds
    b = [[math.cos(i) for i in range(n)]]
    d = paired(a, b)
    diffs = [math.sin(i) * 3 + 0.5 - math.cos(i) for i in range(n)]
    se = statistics.stdev(diffs) / math.sqrt(n)
    assert d["n"] == n and d["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert d["se"] == pytest.approx(se, rel=1e-12)
    half = (d["high"] - d["low"]) / 2
    assert half == pytest.approx(T975[df] * se, rel=2e-4)  # tables to 6 digits; the expansion within 2e-4 from 9 degrees of freedom
    assert d["decided"] == (not d["low"] <= 0 <= d["high"])


def test_a_clear_difference_is_decided_and_noise_is_not():
    base = [float(i % 7) for i in range(60)]
    assert paired([[x + 2 for x in base]], [base])["decided"]
    noise = [(-1) ** i * 0.5 for i in range(60)]
    assert not paired([[x + y for x, y in zip(base, noise)]], [base])["decided"]
