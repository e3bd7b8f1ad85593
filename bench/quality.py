"""``make bench-quality``: does SWITCH beat the baselines? Multi-seed, with confidence intervals.

Setting 1, the synthetic suite (the demo's teacher, student and budget): SWITCH's tau0, decay,
training divergence and dataset-mixing ratio are chosen on the *dev* split (the sweep is
recorded), then every method is trained with ``--seeds`` seeds and scored on the test split.
Setting 2, stories260K: the real pretrained tiny Llama teacher, a student ~6.6x smaller, each
method with ``--seeds`` seeds; teacher NLL of student samples and student NLL of teacher samples.

Prints one JSON summary line per setting and writes ``results.json``/``report.md``/PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from switchkd.config import load_config  # noqa: E402
from switchkd.demo import METHODS, Budget, prepare, score, train_method, write_report  # noqa: E402
from switchkd.evaluate import ci95  # noqa: E402
from switchkd.report import teacher_share_profile  # noqa: E402
from switchkd.train import train  # noqa: E402


def dev_score(final: Path, b: Budget) -> float:
    return score(final, b, split="dev", seeds=(10, 20))["rougeL"]


def sweep_switch(teacher: Path, init: Path, b: Budget, out: Path) -> tuple[List[str], List[dict]]:
    """Coordinate search on the dev split: tau0, then decay, then divergence, then mixing ratio."""
    rows: List[dict] = []

    def run(extra: List[str]) -> float:
        tag = "_".join(x.split(".")[-1] for x in extra).replace("=", "")
        final = out / f"sweep-{tag}" / "final"
        if not (final / "config.json").is_file():  # finished sweep runs are reused
            final = train_method("switch", teacher, init, out / f"sweep-{tag}", replace(b, student_steps=40), seed=1,
                                 extra=extra)
        prof = teacher_share_profile(out / f"sweep-{tag}" / "metrics.jsonl")
        frac = [json.loads(x).get("switch/teacher_frac") for x in (out / f"sweep-{tag}/metrics.jsonl").read_text().splitlines()]
        frac = [f for f in frac if f is not None]
        rows.append({"overrides": extra, "dev_rougeL": dev_score(final, b),
                     "teacher_frac": statistics.fmean(frac) if frac else None, "profile": prof})
        print(json.dumps({"sweep": extra, "dev_rougeL": rows[-1]["dev_rougeL"], "teacher_frac": rows[-1]["teacher_frac"]}))
        return rows[-1]["dev_rougeL"]

    best = ["method.switch.tau0=0.3", "method.switch.decay=0.02", "method.divergence=srkl", "method.switch.ratio=1.0"]
    stages = [("method.switch.tau0", ["0.1", "0.3", "0.6"]), ("method.switch.decay", ["0.02", "0.1"]),
              ("method.divergence", ["srkl", "skl"]), ("method.switch.ratio", ["1.0", "0.5"])]
    scores: Dict[tuple, float] = {}
    for key, values in stages:
        results = {}
        for v in values:
            cand = [x for x in best if not x.startswith(key + "=")] + [f"{key}={v}"]
            k = tuple(sorted(cand))
            if k not in scores:
                scores[k] = run(cand)
            results[v] = scores[k]
        best = [x for x in best if not x.startswith(key + "=")] + [f"{key}={max(results, key=results.get)}"]
    return best, rows


def synthetic(seeds: List[int], out: Path, do_sweep: bool) -> dict:
    b = Budget()
    teacher, init = prepare(b)
    best, sweep = (sweep_switch(teacher, init, b, out / "sweep") if do_sweep else
                   (["method.switch.tau0=0.1", "method.switch.decay=0.1"], []))
    results: Dict[str, List[dict]] = {"teacher": [score(teacher, b)], "init": [score(init, b)]}
    times: Dict[str, List[float]] = {}
    for seed in seeds:
        for name in METHODS:
            final = out / f"{name}-s{seed}" / "final"
            if not (final / "config.json").is_file():  # finished runs are reused: the benchmark resumes
                t0 = time.time()
                final = train_method(name, teacher, init, out / f"{name}-s{seed}", b, seed=seed,
                                     extra=best if name == "switch" else [])
                times.setdefault(name, []).append(time.time() - t0)
            results.setdefault(name, []).append(score(final, b))
    summary = {m: {"mean": statistics.fmean(r["rougeL"] for r in runs), "ci95": ci95([r["rougeL"] for r in runs]),
                   "runs": [r["rougeL"] for r in runs],
                   "by_length": {bk: statistics.fmean(r["by_length"][bk]["rougeL"] for r in runs if bk in r["by_length"])
                                 for bk in runs[0]["by_length"]},
                   "train_s": statistics.fmean(times[m]) if m in times else None} for m, runs in results.items()}
    header = (f"# Quality benchmark: synthetic suite\n\nSeeds {seeds}; SWITCH settings chosen on dev: {best}. "
              "ROUGE-L mean ± 95% CI over training seeds (each run scored with 2 sampling seeds).")
    write_report(out / "synthetic", results, out / f"switch-s{seeds[0]}/metrics.jsonl", header)
    return {"setting": "synthetic", "switch_best": best, "sweep": sweep, "summary": summary}


def stories(seeds: List[int], out: Path, steps: int = 150) -> dict:
    import stories as st

    root = out / "stories"
    root.mkdir(parents=True, exist_ok=True)
    teacher = st.make_teacher(root)
    data = st.make_data(teacher, root, {"train": 1536, "dev": 64, "test": 96})
    student0 = st.make_student(teacher, root / "student-random")
    common = [f"data.train={data['train']}", f"data.dev={data['dev']}", "data.max_prompt_length=64",
              "data.max_length=160", "eval.max_prompt_length=64", "eval.max_length=160", "eval.limit=32",
              "method.max_new_tokens=96", "train.batch_size=16", "train.lr=3e-3", "train.log_every=25"]
    init_run = root / "init"
    if not (init_run / "final/config.json").is_file():
        train(load_config(None, common + [f"model.name={student0}", "method.name=sft", "method.kd_ratio=0",
                                          "train.max_steps=150", "train.warmup_steps=20", "train.keep_best=false",
                                          "data.dev=null", f"output.dir={init_run}", "output.overwrite=true"]))
    init = init_run / "final"
    results: Dict[str, List[dict]] = {"teacher": [st.nll_metrics(teacher, teacher, data["test"], 1)],
                                      "init": [st.nll_metrics(init, teacher, data["test"], 1)]}
    for seed in seeds:
        for name, overrides in METHODS.items():
            cfg = load_config(None, common + overrides + [
                f"model.name={init}", f"teacher.name={teacher}", f"train.max_steps={steps}", f"train.seed={seed}",
                "train.eval_every=50", "train.keep_best=false", f"output.dir={root / f'{name}-s{seed}'}", "output.overwrite=true"])
            final = root / f"{name}-s{seed}" / "final"
            if not (final / "config.json").is_file():  # finished runs are reused
                final = train(cfg)
            results.setdefault(name, []).append(st.nll_metrics(final, teacher, data["test"], seed))
    keys = ["teacher_nll_of_student_samples", "student_nll_of_teacher_samples", "rougeL_vs_teacher"]
    summary = {m: {k: {"mean": statistics.fmean(r[k] for r in runs), "ci95": ci95([r[k] for r in runs])} for k in keys}
               for m, runs in results.items()}
    lines = ["| method | runs | teacher NLL of student samples ↓ | student NLL of teacher samples ↓ | ROUGE-L vs teacher ↑ |",
             "|---|---:|---:|---:|---:|"]
    for m, s in summary.items():
        cells = " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['ci95']:.3f}" for k in keys)
        lines.append(f"| {m} | {len(results[m])} | {cells} |")
    (root / "report.md").write_text("# Quality benchmark: stories260K\n\n" + "\n".join(lines) + "\n")
    return {"setting": "stories260K", "summary": summary, "table": "\n".join(lines)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--settings", nargs="+", default=["synthetic", "stories"], choices=["synthetic", "stories"])
    p.add_argument("--no-sweep", action="store_true", help="skip SWITCH's dev sweep (use tau0 0.1, decay 0.1)")
    p.add_argument("--stories-steps", type=int, default=150, help="training steps per method on stories260K")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = out / "results.json"
    all_results = json.loads(prev.read_text()) if prev.is_file() else {}
    for setting in args.settings:
        t0 = time.time()
        res = (synthetic(args.seeds, out, not args.no_sweep) if setting == "synthetic"
               else stories(args.seeds, out, args.stories_steps))
        res["seconds"] = time.time() - t0
        all_results[setting] = res
        (out / "results.json").write_text(json.dumps(all_results, indent=1, default=str))
        print(json.dumps({"setting": setting, "seconds": round(res["seconds"]),
                          "rougeL_or_nll": {m: round(v["mean"], 2) if "mean" in v else
                                            round(v["teacher_nll_of_student_samples"]["mean"], 3)
                                            for m, v in res["summary"].items()}}))


if __name__ == "__main__":
    main()
