"""Does SWITCH beat the baselines, most on long responses?  (``make bench-long``)

Setting: the built-in synthetic suite (answers of 1 to 180 bytes, long ones made of many steps where an
early error compounds), the demo's teacher and a half-depth student initialised from it
(:func:`switchkd.demo.layer_dropped_init`).  SWITCH's decay is the paper's 1/10 and its tau0 is
calibrated on the *dev* prompts (:func:`switchkd.calibrate.calibrate_config`) to the paper's teacher
share (53% by default); nothing is chosen on test.  Every method (SFT, KD, GKD, SWITCH and SKD, its
closest published relative, by default)
trains the same number of optimizer steps on the same batch size from the same initialisation, for
each training seed, and is scored on the test split (sampled, the demo's two sampling seeds), overall
and by reference length.  Writes ``results.json`` and ``report.md`` (mean ± 95% CI over training
seeds) and prints a plain verdict.  Finished runs are reused (delete the output directory to redo).

``--device cuda`` (``--setting large``): a larger teacher (8 layers, 256 wide, trained here by SFT for
3,000 steps and cached), a student of its even blocks, 300 steps per method; meant to finish within 20
minutes on one GPU.  ``--smoke``: the whole path at a few steps (a minute or two on 2 CPU cores);
``--setting large --smoke`` runs the GPU setting's code on the CPU.

    python bench/long_response.py [--seeds 1 2 3] [--steps 50] [--target 0.53] [--device cpu|cuda]
                                 [--setting demo|large] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switchkd import demo  # noqa: E402
from switchkd.calibrate import calibrate_config  # noqa: E402
from switchkd.config import load_config  # noqa: E402

LARGE = "tiny:gpt2,layers=8,dim=256,heads=8,seed=1"  # the GPU setting's teacher


def setting(device: str, large: bool, smoke: bool) -> tuple[Path, Path, demo.Budget]:
    """``(teacher, student init, budget)``: the demo's models, or (``large``, the GPU setting) a larger
    teacher trained here and cached, with a student of its even blocks."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/long_response.py: --device cuda needs a CUDA GPU")
    if large:
        big = demo.Budget(size=8000, teacher_steps=3000, batch=32, student_steps=300, test=112)
        if smoke:  # the large path's code at a few steps (CPU-checkable)
            big = replace(big, size=200, teacher_steps=3, batch=8, student_steps=2, test=8, seeds=(10,))
        teacher = demo._cached_sft("teacher-large", LARGE, big.teacher_steps, 1e-3, big)
        from switchkd.models import drop_layers

        init = demo.cache_dir() / f"long-init-{teacher.name}"
        if not (init / "config.json").is_file():
            drop_layers(str(teacher), (0, 2, 4, 6), init)
        return teacher, init, replace(big, eval_every=0)
    teacher = demo.shipped_teacher()
    b = replace(demo.DEMO, test=112)
    if smoke:
        b = replace(demo.QUICK, eval_every=0)
    return teacher, demo.layer_dropped_init(teacher), b


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t, 97.5%


def verdict(results: dict, methods: list) -> list:
    """Plain sentences: SWITCH against each baseline overall and in every length bucket holding at least
    10 test prompts (Student-t 95% CIs over training seeds, differences paired by seed; the report's table
    uses the normal approximation, which is 2.2x narrower at 3 seeds)."""
    if "switch" not in results:
        return []
    def values(runs: list, key: str | None) -> list:
        return [r["rougeL"] if key is None else r["by_length"][key]["rougeL"] for r in runs]

    def stats_of(vals: list) -> tuple[float, float]:
        if len(vals) < 2:
            return statistics.fmean(vals), float("nan")
        return statistics.fmean(vals), T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / len(vals) ** 0.5

    def stats(runs: list, key: str | None) -> tuple[float, float]:
        return stats_of(values(runs, key))
    sizes = {b: v["n"] for b, v in results["switch"][0]["by_length"].items()}
    buckets = sorted((b for b in sizes if sizes[b] >= 10), key=lambda b: int(b.lstrip(">").split("-")[0]))
    lines = []
    for key, label in [(None, "overall")] + [(b, f"{b} words ({sizes[b]} prompts)") for b in buckets]:
        s, sc = stats(results["switch"], key)
        for m in methods:
            if m == "switch":
                continue
            o, oc = stats(results[m], key)
            d, dc = stats_of([a - b for a, b in zip(values(results["switch"], key), values(results[m], key))])
            decided = dc == dc and abs(d) > dc
            lines.append(f"{label}: SWITCH {s:.1f} ± {sc:.1f} vs {m} {o:.1f} ± {oc:.1f}; paired by training seed, "
                         f"SWITCH − {m} = {d:+.1f} ± {dc:.1f} ({'SWITCH ' + ('ahead' if d > 0 else 'behind') if decided else 'not decided'})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 50; cuda 300)")
    ap.add_argument("--methods", default="sft,kd,gkd,switch,skd")
    ap.add_argument("--target", type=float, default=0.53, help="SWITCH teacher share to calibrate tau0 to (dev)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--test", type=int, default=None, help="test prompts (default 112); finished models are rescored")
    ap.add_argument("--setting", choices=["demo", "large"], default=None,
                    help="models and budget (default: large on cuda, demo on cpu)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="runs/bench-long")
    args = ap.parse_args()
    t0, out, methods = time.time(), Path(args.out), args.methods.split(",")
    large = args.setting == "large" if args.setting else args.device == "cuda"
    teacher, init, b = setting(args.device, large, args.smoke)
    if args.steps:
        b = replace(b, student_steps=args.steps)
    if args.test:
        b = replace(b, test=args.test)
    out.mkdir(parents=True, exist_ok=True)
    cal = load_config(None, demo.COMMON + demo.METHODS["switch"] + [f"model.name={init}", f"teacher.name={teacher}"])
    tau0, share = calibrate_config(cal, args.target, limit=8 if args.smoke else 32)
    print(f"SWITCH tau0 {tau0:.5g} (decay 0.1) gives a teacher share of {share:.2f} on dev (target {args.target})")
    extra = [f"method.switch.tau0={tau0}"]
    workers = args.workers or (1 if args.device == "cuda" else min(2, os.cpu_count() or 1))
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    if results.get("_setting") != [str(teacher), b.student_steps, tau0, b.test]:
        results = {"_setting": [str(teacher), b.student_steps, tau0, b.test]}
    todo = [("score", n, 0) for n in ("teacher", "init") if n not in results]
    todo += [("method", m, s) for s in args.seeds for m in methods if f"{m}@{s}" not in results]
    calls = [dict(kind=k, name=n, teacher=teacher, init=init, out=out, b=b, seed=s or 1,
                  extra=extra if n == "switch" else (), tag=f"@{s}" if s else "", reuse=True) for k, n, s in todo]
    for (kind, name, seed), (_, result, seconds) in zip(todo, demo.run_tasks(calls, workers)):
        results[name if kind == "score" else f"{name}@{seed}"] = result
        cache.write_text(json.dumps(results))
        print(f"  {name}{'' if kind == 'score' else f' seed {seed}'}: ROUGE-L {result['rougeL']:.1f} ({seconds:.0f} s)",
              flush=True)
    grouped = {"teacher": [results["teacher"]], "init": [results["init"]]}
    grouped |= {m: [results[f"{m}@{s}"] for s in args.seeds] for m in methods}
    lines = verdict(grouped, methods)
    header = (f"# SWITCH long-response benchmark\n\nTeacher `{teacher}`, student = its layer-dropped copy `{init.name}`; "
              f"{b.student_steps} steps per method (batch {b.batch}, lr {b.lr}), training seeds {args.seeds}; "
              f"SWITCH tau0 {tau0:.5g}, decay 0.1 (dev teacher share {share:.2f}); test split, {b.test} prompts, "
              f"sampling seeds {list(b.seeds)}; ± = 95% CI over training seeds. Run time {time.time() - t0:.0f} s.\n\n"
              + "\n".join(f"- {x}" for x in lines))
    report = demo.write_report(out, grouped, out / "switch@1/metrics.jsonl", header)
    from switchkd.report import method_table

    print(method_table(grouped))
    print("\n".join(lines))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
