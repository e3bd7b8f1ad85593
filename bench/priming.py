"""Response priming on the built-in arithmetic suite (``make bench-priming``).

The experiment of Goyal et al. (2024) in miniature: a teacher writes worked rationales under each
priming strategy (``none``, ``teacher``, ``ground_truth``, ``confidence``), and a student is distilled
from it (SeqKD on the primed teacher's greedy rationales, and word-level KD with the primed teacher's
logits on the dataset rationales); student accuracy (final answer, greedy) on ``arith:test``, mean and
95% CI over training seeds.  An instruction-tuned LLM teacher can read a priming prefix; a tiny
teacher cannot unless it has seen such prefixes, so the teacher is fine-tuned on the suite with a
random priming prefix (ground-truth prefixes carrying the reference) on half of its prompts.

    python bench/priming.py                      # CPU, ~25 min on 2 cores
    python bench/priming.py --smoke              # seconds: the pipeline only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from switchkd.arith import make_split  # noqa: E402
from switchkd.config import load_config  # noqa: E402
from switchkd.evaluate import generate_texts  # noqa: E402
from switchkd.metrics import accuracy  # noqa: E402
from switchkd.models import load_model, load_tokenizer  # noqa: E402
from switchkd.priming import teacher_prompt  # noqa: E402
from switchkd.train import train  # noqa: E402

PRIMINGS = ("none", "teacher", "ground_truth", "confidence")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided 95% t quantiles by degrees of freedom


def teacher_data(path: Path, n: int) -> None:
    """The teacher's fine-tuning set: the suite, half of the prompts behind a random priming prefix."""
    r = random.Random(0)
    rows = []
    for e in make_split("train", n):
        strategy = r.choice(PRIMINGS[1:]) if r.random() < 0.5 else "none"
        rows.append({"instruction": e.instruction, "output": e.references[0],
                     "prompt": teacher_prompt(strategy, e.prompt, e.references[0])})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))


def common(a: argparse.Namespace) -> list:
    return [f"data.synthetic_size={a.train_size}", "data.max_prompt_length=200", "data.max_length=256",
            "data.dev=null", "train.keep_best=false", "train.log_every=50", "train.warmup_steps=20",
            "eval.max_prompt_length=200", "eval.max_length=256", "output.overwrite=true"]


def accuracy_of(model_dir: Path, a: argparse.Namespace, strategy: str = "none") -> float:
    """Greedy final-answer accuracy on ``arith:test`` (the prompt primed with ``strategy``)."""
    mc = load_config(None, [f"model.name={model_dir}"]).model
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False)
    ecfg = load_config(None, common(a) + ["eval.do_sample=false", "eval.max_new_tokens=60"]).eval
    test = make_split("test", a.test)
    prompts = [teacher_prompt(strategy, e.prompt, e.references[0]) for e in test]
    texts = generate_texts(model, tok, prompts, ecfg, None, desc="test")
    return statistics.fmean(accuracy(t, e.references) for t, e in zip(texts, test))


def ci(xs: list) -> float:
    return T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-priming")
    p.add_argument("--teacher", default="tiny:gpt2,layers=4,dim=128,heads=4,seed=1")
    p.add_argument("--student", default="tiny:gpt2,layers=2,dim=96,heads=4,seed=2")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--student-steps", type=int, default=250)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=["seqkd", "kd"])
    p.add_argument("--primings", nargs="+", default=list(PRIMINGS), choices=PRIMINGS)
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a few steps: checks the pipeline only")
    a = p.parse_args()
    if a.smoke:
        a.teacher, a.student = "tiny:gpt2,layers=1,dim=32,heads=2,seed=1", "tiny:gpt2,layers=1,dim=32,heads=2,seed=2"
        a.teacher_steps, a.student_steps, a.train_size, a.test, a.seeds = 2, 2, 40, 4, [1, 2]
        a.teacher_batch = 8
    out, t0 = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    teacher_data(out / "teacher_train.jsonl", a.train_size)
    teacher = train(load_config(None, common(a) + [
        f"model.name={a.teacher}", f"data.train={out / 'teacher_train.jsonl'}", f"train.max_steps={a.teacher_steps}",
        f"train.batch_size={a.teacher_batch}", "train.lr=2.5e-3", f"output.dir={out / 'teacher'}"]))
    results = {"teacher_accuracy": {s: accuracy_of(teacher, a, s) for s in PRIMINGS}, "students": {}}
    print("teacher accuracy by priming:", results["teacher_accuracy"], flush=True)
    overrides = {"seqkd": ["method.source=teacher", "method.divergence=ce", "method.do_sample=false",
                           "method.max_new_tokens=60"],
                 "kd": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=1.0"]}
    for method in a.methods:
        for strategy in a.primings:
            accs = []
            for seed in a.seeds:
                run = out / f"{method}-{strategy}-{seed}"
                final = train(load_config(None, common(a) + overrides[method] + [
                    f"model.name={a.student}", f"teacher.name={teacher}", "data.train=arith", f"method.name={method}",
                    f"method.priming={strategy}", f"train.seed={seed}", f"data.seed={seed}",
                    f"train.max_steps={a.student_steps}", "train.batch_size=16", "train.lr=2e-3", f"output.dir={run}"]))
                accs.append(accuracy_of(final, a))
            results["students"][f"{method}/{strategy}"] = {"accuracy": accs, "mean": statistics.fmean(accs), "ci95": ci(accs)}
            print(f"{method} {strategy}: {statistics.fmean(accs):.1f} ± {ci(accs):.1f} ({accs})", flush=True)
    results["seconds"] = round(time.time() - t0)
    results["args"] = vars(a)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | priming | student accuracy (%) | 95% CI | per seed |\n|---|---|---:|---:|---|")
    for key, r in results["students"].items():
        m, s = key.split("/")
        print(f"| {m} | {s} | {r['mean']:.1f} | ± {r['ci95']:.1f} | {', '.join(f'{x:.1f}' for x in r['accuracy'])} |")
    print(f"\nteacher accuracy under each priming: {results['teacher_accuracy']}; {results['seconds']} s")


if __name__ == "__main__":
    main()
