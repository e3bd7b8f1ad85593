"""Score every finished run of ``bench/quality.py`` (for runs stopped before their summary).

Synthetic runs (``<out>/<method>-s<seed>/final``) are scored like ``bench/quality.py`` scores them
(test split, sampling seeds 10 and 20); stories runs (``<out>/stories/<method>-s<seed>/final``)
with ``bench/stories.nll_metrics``.  Writes ``collected.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from switchkd.demo import METHODS, Budget, prepare, score  # noqa: E402
from switchkd.evaluate import ci95  # noqa: E402


def runs(root: Path) -> dict:
    found: dict = {}
    for d in sorted(root.glob("*-s[0-9]*")):
        m = re.fullmatch(r"(.+)-s(\d+)", d.name)
        if m and m.group(1) in METHODS and (d / "final/config.json").is_file():
            found.setdefault(m.group(1), []).append((int(m.group(2)), d / "final"))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--synthetic", default="runs/bench-quality")
    p.add_argument("--stories", default="runs/bench-quality-stories/stories")
    args = p.parse_args()
    out: dict = {}
    syn = runs(Path(args.synthetic))
    if syn:
        b = Budget()
        teacher, init = prepare(b)
        res = {"teacher": [score(teacher, b)], "init": [score(init, b)]}
        for m in METHODS:
            res.update({m: [score(f, b) for _, f in syn.get(m, [])]} if m in syn else {})
        out["synthetic"] = {m: {"seeds": [s for s, _ in syn.get(m, [(None, None)])], "rougeL": [r["rougeL"] for r in v],
                                "by_length": {k: statistics.fmean(r["by_length"][k]["rougeL"] for r in v if k in r["by_length"])
                                              for k in v[0]["by_length"]}} for m, v in res.items() if v}
    st_root = Path(args.stories)
    stories = runs(st_root)
    if stories:
        import stories as st

        teacher, test = st_root / "stories260K-hf", st_root / "stories-test.jsonl"
        res = {"teacher": [st.nll_metrics(teacher, teacher, test, 1)], "init": [st.nll_metrics(st_root / "init/final", teacher, test, 1)]}
        for m in METHODS:
            if m in stories:
                res[m] = [st.nll_metrics(f, teacher, test, s) for s, f in stories[m]]
        out["stories"] = res
    Path(args.synthetic, "collected.json").write_text(json.dumps(out, indent=1))
    if "synthetic" in out:
        S = out["synthetic"]
        buckets = list(S["teacher"]["by_length"])
        print("| method | runs | ROUGE-L | " + " | ".join(f"len {b}" for b in buckets) + " |")
        print("|---|---:|---:|" + "---:|" * len(buckets))
        for m, v in S.items():
            vals = v["rougeL"]
            ci = f" ± {ci95(vals):.2f}" if len(vals) > 1 else ""
            cells = " | ".join(f"{v['by_length'].get(b, float('nan')):.1f}" for b in buckets)
            print(f"| {m} | {len(vals)} ({', '.join(f'{x:.1f}' for x in vals)}) | {statistics.fmean(vals):.2f}{ci} | {cells} |")
    if "stories" in out:
        keys = ["teacher_nll_of_student_samples", "student_nll_of_teacher_samples", "rougeL_vs_teacher"]
        print("\n| method | runs | teacher NLL of student samples ↓ | student NLL of teacher samples ↓ | ROUGE-L vs teacher ↑ |")
        print("|---|---:|---:|---:|---:|")
        for m, v in out["stories"].items():
            cells = []
            for k in keys:
                vals = [r[k] for r in v]
                ci = f" ± {ci95(vals):.3f}" if len(vals) > 1 else ""
                cells.append(f"{statistics.fmean(vals):.3f}{ci}")
            print(f"| {m} | {len(v)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
