"""Response priming on the built-in arithmetic suite (``make bench-priming``).

The experiment of Goyal et al. (2024) in miniature: a teacher writes worked rationales under each
priming strategy (``none``, ``teacher``, ``ground_truth``, ``confidence``), and a student is distilled
from it, by SeqKD (offline: the primed teacher's greedy rationales for the training prompts, written
once per priming by :func:`switchkd.generate.generate_dataset`, then cross-entropy) and by word-level KD
(forward KL to the primed teacher's logits on the dataset rationales), beside SFT on the dataset's
reference rationales (no teacher: what a teacher that copied them perfectly would give SeqKD).
Reported: the teacher's accuracy under each priming, the share of its training rationales that end in
the right answer, and student accuracy (greedy final answer on the suite's test split), mean and 95%
t-interval over training seeds.

A tiny model reads no English, so the teacher is taught to read a prefix as an instruction-tuned LLM
does: it is trained on the suite with the toolkit's own priming prefixes on its prompts (``--gt-share``
of them behind the ground-truth prefix, which carries the reference; a tenth of the rest behind
``teacher`` or ``confidence``).  The suite is the carrying two-digit variant (``--max-value 99``): a
4-layer Llama trained from scratch learns to copy a reference it is shown well before it learns to
compute the rationale, which is the regime the paper's mechanism needs (a teacher that errs unprimed
and is corrected by the prefix; ``bench/priming_probe.py`` measures it).  ``--teacher demo`` fine-tunes
the shipped demo teacher instead (it does not learn to read the prefix at this budget).  The student
starts from the trained teacher's blocks 0 and 3 (the demo's layer-dropped initialisation).  Finished
runs are reused (delete ``--out`` to redo).

    python bench/priming.py                      # CPU, about 50 minutes on 2 cores
    python bench/priming.py --smoke              # a minute: the pipeline only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switchkd import demo  # noqa: E402
from switchkd.arith import make_split  # noqa: E402
from switchkd.config import load_config  # noqa: E402
from switchkd.evaluate import generate_texts  # noqa: E402
from switchkd.generate import generate_dataset  # noqa: E402
from switchkd.metrics import accuracy  # noqa: E402
from switchkd.models import drop_layers, load_model, load_tokenizer  # noqa: E402
from switchkd.priming import teacher_prompt  # noqa: E402
from switchkd.train import train  # noqa: E402

PRIMINGS = ("none", "teacher", "ground_truth", "confidence")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided 95% t quantiles by degrees of freedom
METHODS = {"seqkd": ["method.source=dataset", "method.divergence=ce", "method.kd_ratio=0.0"],
           "sft": ["method.source=dataset", "method.divergence=ce", "method.kd_ratio=0.0"],  # the references
           "kd": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=1.0"]}


def teacher_data(path: Path, a: argparse.Namespace) -> None:
    """The teacher's training set: ``a.gt_share`` of the prompts behind the ground-truth prefix, a tenth
    of the rest behind ``teacher`` or ``confidence``, the others unprimed."""
    r, rows = random.Random(0), []
    for e in make_split("train", a.teacher_size, max_value=a.max_value):
        u = r.random()
        strategy = ("ground_truth" if u < a.gt_share else
                    r.choice(("teacher", "confidence")) if r.random() < 0.1 else "none")
        rows.append({"instruction": e.instruction, "output": e.references[0],
                     "prompt": teacher_prompt(strategy, e.prompt, e.references[0])})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))


def student_data(path: Path, a: argparse.Namespace) -> Path:
    """The students' training prompts with their reference rationales (the suite as JSONL)."""
    path.write_text("".join(json.dumps({"instruction": e.instruction, "prompt": e.prompt, "output": e.references[0]})
                            + "\n" for e in make_split("train", a.student_size, max_value=a.max_value)))
    return path


COMMON = ["data.max_prompt_length=200", "data.max_length=256", "data.dev=null", "train.keep_best=false",
          "train.log_every=50", "train.warmup_steps=20", "eval.max_prompt_length=200", "eval.max_length=256",
          "output.overwrite=true"]


def finished(run: Path, make) -> Path:
    """``run/final`` when it exists, else ``make()`` (which trains into ``run``)."""
    return run / "final" if (run / "final" / "config.json").is_file() else make()


def accuracy_of(model_dir: Path, a: argparse.Namespace, strategy: str = "none") -> float:
    """Greedy final-answer accuracy on the suite's test split (the prompt primed with ``strategy``)."""
    mc = load_config(None, [f"model.name={model_dir}"]).model
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False)
    ecfg = load_config(None, COMMON + ["eval.do_sample=false", "eval.max_new_tokens=60", "eval.batch_size=50"]).eval
    test = make_split("test", a.test, max_value=a.max_value)
    prompts = [teacher_prompt(strategy, e.prompt, e.references[0]) for e in test]
    texts = generate_texts(model, tok, prompts, ecfg, None, desc="test")
    return statistics.fmean(accuracy(t, e.references) for t, e in zip(texts, test))


def seqkd_data(teacher: Path, strategy: str, out: Path, a: argparse.Namespace) -> tuple[Path, float]:
    """The primed teacher's greedy rationales for the students' training prompts (written once), and
    the share of them whose final answer is right."""
    path = out / f"seqkd-{strategy}.jsonl"
    if not path.is_file():
        generate_dataset(load_config(None, COMMON + [
            f"model.name={teacher}", f"teacher.name={teacher}", f"data.train={out / 'students_train.jsonl'}", f"method.priming={strategy}", "method.decoding.do_sample=false",
            "method.max_new_tokens=60"]), path, batch_size=50)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    refs = {e.instruction: e.references for e in make_split("train", a.student_size, max_value=a.max_value)}
    return path, statistics.fmean(accuracy(r["output"], refs[r["instruction"]]) for r in rows)


def student(method: str, strategy: str, seed: int, teacher: Path, init: Path, data: str, out: Path,
            a: argparse.Namespace, threads: int) -> float:
    """Train one student (in a worker process) and return its test accuracy."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    run = out / f"{method}-{strategy}-{seed}"
    kd = [f"teacher.name={teacher}", f"method.priming={strategy}"] if method == "kd" else []  # SeqKD: data only
    with open(run.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        final = finished(run, lambda: train(load_config(None, COMMON + METHODS[method] + kd + [
            f"model.name={init}", f"data.train={data}",
            f"method.name={method}", f"train.seed={seed}", f"data.seed={seed}", f"train.max_steps={a.student_steps}",
            f"train.batch_size={a.student_batch}", f"train.lr={a.student_lr}", f"output.dir={run}"])))
        return accuracy_of(final, a)


def ci(xs: list) -> float:
    return T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-priming")
    p.add_argument("--teacher", default="tiny:llama,layers=4,dim=128,heads=4,seed=1",
                   help="a tiny spec trained from scratch, or 'demo': fine-tune the shipped demo teacher")
    p.add_argument("--max-value", type=int, default=99, help="the arithmetic suite's largest value")
    p.add_argument("--teacher-steps", type=int, default=1200)
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--teacher-size", type=int, default=3000, help="teacher training problems")
    p.add_argument("--gt-share", type=float, default=0.8, help="teacher data behind the ground-truth prefix")
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--student-batch", type=int, default=32)
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument("--student-size", type=int, default=2000, help="students' training prompts")
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--primings", nargs="+", default=list(PRIMINGS), choices=PRIMINGS)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--smoke", action="store_true", help="a few steps: checks the pipeline only")
    a = p.parse_args()
    if a.smoke:
        a.teacher_steps, a.student_steps, a.teacher_size, a.student_size, a.test = 2, 2, 40, 40, 4
        a.teacher_batch, a.student_batch, a.seeds = 8, 8, [1, 2]
    return a


def main() -> None:
    a, t0 = args(), time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_data(out / "teacher_train.jsonl", a)
    spec = str(demo.shipped_teacher()) if a.teacher == "demo" else a.teacher
    teacher = finished(out / "teacher", lambda: train(load_config(None, COMMON + [
        f"model.name={spec}", f"data.train={out / 'teacher_train.jsonl'}", f"train.max_steps={a.teacher_steps}",
        f"train.batch_size={a.teacher_batch}", f"train.lr={a.teacher_lr}", "train.scheduler=constant",
        f"output.dir={out / 'teacher'}"])))
    init = out / "student-init"
    if not (init / "config.json").is_file():  # written aside, then renamed: never half a model
        shutil.rmtree(init.with_suffix(".tmp"), ignore_errors=True)
        drop_layers(str(teacher), demo.KEEP, init.with_suffix(".tmp"))
        shutil.rmtree(init, ignore_errors=True)
        init.with_suffix(".tmp").rename(init)
    students_train = student_data(out / "students_train.jsonl", a)
    results = {"teacher_accuracy": {s: accuracy_of(teacher, a, s) for s in PRIMINGS}, "seqkd_data_accuracy": {},
               "init_accuracy": accuracy_of(init, a), "students": {}}
    print("teacher accuracy by priming:", results["teacher_accuracy"], flush=True)
    data = {}
    for s in a.primings:
        path, share = seqkd_data(teacher, s, out, a)
        data[s] = path
        results["seqkd_data_accuracy"][s] = share
    print("SeqKD rationales ending in the right answer:", results["seqkd_data_accuracy"], flush=True)
    primings = {m: ("references",) if m == "sft" else a.primings for m in a.methods}  # SFT: no teacher
    jobs = [(m, s, seed) for m in a.methods for s in primings[m] for seed in a.seeds]
    calls = [dict(method=m, strategy=s, seed=seed, teacher=teacher, init=init, out=out, a=a,
                  data=str(data[s]) if m == "seqkd" else str(students_train)) for m, s, seed in jobs]
    accs = list(demo.run_tasks(calls, a.workers, student))
    for m in a.methods:
        for s in primings[m]:
            xs = [acc for (m2, s2, _), acc in zip(jobs, accs) if (m2, s2) == (m, s)]
            results["students"][f"{m}/{s}"] = {"accuracy": xs, "mean": statistics.fmean(xs), "ci95": ci(xs)}
    results["seconds"] = round(time.time() - t0)
    results["args"] = vars(a)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ninit accuracy {results['init_accuracy']:.1f}; teacher accuracy under each priming: "
          f"{results['teacher_accuracy']}; SeqKD data accuracy: {results['seqkd_data_accuracy']}")
    print("\n| method | priming | student accuracy (%) | 95% CI | per seed |\n|---|---|---:|---:|---|")
    for key, r in results["students"].items():
        m, s = key.split("/")
        print(f"| {m} | {s} | {r['mean']:.1f} | ± {r['ci95']:.1f} | {', '.join(f'{x:.1f}' for x in r['accuracy'])} |")
    print(f"\n{results['seconds']} s")


if __name__ == "__main__":
    main()
