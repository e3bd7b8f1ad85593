"""bench/real.py's report: ``report.md`` from its results, and the paired 95% intervals (SWITCH minus each model,
over the same prompts) that decide a difference."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List

METHODS = ("sft", "kd", "seqkd", "gkd", "distillm", "minillm", "switch")
SETS = ("dolly", "self-inst", "vicuna", "sinst", "uinst")


def t975(df: int) -> float:
    """Student's t 0.975 quantile at ``df`` degrees of freedom: the normal quantile's Cornish-Fisher expansion to
    the third order (Abramowitz and Stegun 26.7.5; within 2e-4 of the tables from 9 degrees of freedom)."""
    z = 1.959963985
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def paired(a: List[List[float]], b: List[List[float]]) -> Dict[str, float]:
    """Mean of the paired differences ``a - b`` over prompts (each model's per-prompt scores averaged over its
    training seeds; ``a[j][i]``: training seed j, prompt i) with a 95% interval (Student's t); ``decided``: the
    interval excludes 0."""
    diffs = [statistics.fmean(col_a) - statistics.fmean(col_b) for col_a, col_b in zip(zip(*a), zip(*b))]
    n, mean = len(diffs), statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("inf")
    t = t975(max(1, n - 1))
    return {"n": n, "mean": mean, "se": se, "low": mean - t * se, "high": mean + t * se,
            "decided": not (mean - t * se <= 0 <= mean + t * se)}


def mean_over(scores: List[Dict[str, Any]], name: str) -> tuple[float, float]:
    """Mean ROUGE-L of a set over training seeds and its standard error (prompt-level, pooled)."""
    vals = [sc[name]["rougeL"] for sc in scores]
    ses = [sc[name]["se"] for sc in scores]
    return statistics.fmean(vals), math.sqrt(sum(x * x for x in ses)) / len(ses)


def pooled(scores: List[Dict[str, Any]]) -> List[List[float]]:
    """Per training seed, the per-prompt scores of all five sets in one list (the pairing unit: one prompt)."""
    return [[x for name in SETS for x in sc[name]["per_prompt"]] for sc in scores]


def write_report(out: Path, res: Dict[str, Any], s: Any, setting: str, device: str, seconds: float) -> Path:
    """``report.md``: DistiLLM's table layout, gap closed, paired intervals, by length, the long-response setting,
    teacher share, step time, drafts.  ``s``: bench/real.py's ``Setting`` (budget, prompts, seeds); ``res``: its
    results (``results.json``)."""
    rows = ["teacher", "init", *METHODS]
    lines = [f"# Real pair: SmolLM2-135M-Instruct -> {res['student']} ({setting} setting, {device})", "",
             f"Budget: init = {res['init_note']}; each method {s.steps} optimizer steps x batch {s.batch} from init "
             f"(lr {s.lr}); prompts <= {s.prompt_len} tokens, {s.new_tokens} new tokens; {s.prompts or 'all'} prompts "
             f"per set x sampling seeds {list(s.seeds)}; training seeds {list(s.train_seeds)}; wall time "
             f"{seconds / 60:.1f} min.", "", "ROUGE-L (± standard error over prompts):", "",
             "| model | " + " | ".join(SETS) + " | avg |", "|---|" + "---:|" * (len(SETS) + 1)]
    for r in rows:
        cells, avg = [], []
        for name in SETS:
            m, se = mean_over(res["scores"][r], name)
            cells.append(f"{m:.2f} ± {se:.2f}")
            avg.append(m)
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {statistics.fmean(avg):.2f} |")
    t, i0 = mean_over(res["scores"]["teacher"], "dolly")[0], mean_over(res["scores"]["init"], "dolly")[0]
    lines += ["", f"Gap closed on Dolly (teacher {t:.2f}, init {i0:.2f}):", ""]
    for r in sorted(METHODS, key=lambda r: -mean_over(res["scores"][r], "dolly")[0]):
        m, se = mean_over(res["scores"][r], "dolly")
        lines.append(f"- {r}: {m:.2f} ± {se:.2f}, closes {100 * (m - i0) / (t - i0):.0f}% of the gap"
                     if t != i0 else f"- {r}: {m:.2f}")
    lines += ["", "SWITCH minus each model, paired over the same prompts (all five sets pooled; per-prompt scores "
              "averaged over sampling seeds), mean and 95% interval; *decided* when the interval excludes 0:", "",
              "| SWITCH minus | n | mean | 95% interval | decided |", "|---|---:|---:|---|---|"]
    for r in ["init", *[m for m in METHODS if m != "switch"]]:
        d = res["paired"][r]
        lines.append(f"| {r} | {d['n']} | {d['mean']:+.2f} | [{d['low']:+.2f}, {d['high']:+.2f}] | "
                     f"{'yes' if d['decided'] else 'no'} |")
    lines += ["", "ROUGE-L on Dolly by reference length (words):", ""]
    buckets = list(res["scores"]["teacher"][0]["dolly"]["by_length"])
    lines += ["| model | " + " | ".join(f"{b} (n={res['scores']['teacher'][0]['dolly']['by_length'][b]['n']})"
                                         for b in buckets) + " |", "|---|" + "---:|" * len(buckets)]
    for r in rows:
        bl = [statistics.fmean(sc["dolly"]["by_length"].get(b, {"rougeL": float("nan")})["rougeL"]
                               for sc in res["scores"][r]) for b in buckets]
        lines.append(f"| {r} | " + " | ".join(f"{v:.2f}" for v in bl) + " |")
    n_long = res["long"]["teacher"][0]["n"]
    lines += ["", f"Long responses: {n_long} Dolly test prompts whose reference has >= {s.long_min_words} words, up to "
              f"{s.long_tokens} new tokens, sampling seeds {list(s.seeds)} (SWITCH minus each model paired over these "
              "prompts):", "", "| model | ROUGE-L | response tokens (mean) | SWITCH minus it | 95% interval | decided |",
              "|---|---:|---:|---:|---|---|"]
    for r in rows:
        m = statistics.fmean(x["rougeL"] for x in res["long"][r])
        toks = statistics.fmean(x["response_tokens"] for x in res["long"][r])
        d = res["paired_long"].get(r)
        tail = (f"{d['mean']:+.2f} | [{d['low']:+.2f}, {d['high']:+.2f}] | {'yes' if d['decided'] else 'no'}"
                if d else "- | - | -")
        lines.append(f"| {r} | {m:.2f} | {toks:.0f} | {tail} |")
    cal = res["calibration"]
    lines += ["", f"SWITCH: tau0 {cal['tau0']:.4g} calibrated on {s.calib_prompts} Dolly dev prompts from init (measured "
              f"share {cal['share']:.2f}, target {s.target}); {'below' if cal['tau0'] < math.log(2) else 'above'} ln 2 = "
              "0.693 (below: the gate reacts to disagreement; above: the decay, i.e. the position, decides). Teacher "
              "share in training by response position:", ""]
    prof = res["metrics"]["switch"][0]["teacher_share"]
    lines += ["| " + " | ".join(prof) + " |", "|" + "---:|" * len(prof), "| " + " | ".join(f"{v:.2f}" for v in prof.values()) + " |"]
    if cal.get("note"):
        lines += ["", f"Note (switchkd calibrate): {cal['note']}"]
    lines += ["", "Seconds per optimizer step (mean) and worth as a greedy speculative draft for the teacher "
              f"(k = 4, {s.draft_prompts} Dolly prompts):", "",
              "| model | s/step | tokens per verification | drafted share |", "|---|---:|---:|---:|"]
    for r in ["init", *METHODS]:
        st = [m["step_s"] for m in res["metrics"].get(r, []) if m.get("step_s")]
        d = res["drafts"][r]
        lines.append(f"| {r} | {statistics.fmean(st):.1f} | {d['tokens_per_verification']:.2f} | "
                     f"{100 * d['acceptance']:.1f}% |" if st else
                     f"| {r} | - | {d['tokens_per_verification']:.2f} | {100 * d['acceptance']:.1f}% |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
