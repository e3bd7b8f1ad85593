"""``switchkd demo``: the built-in end-to-end run on the synthetic suite.

Trains (or loads from its cache) a tiny teacher on the synthetic train split,
then distils students with each method from the same initialisation, and prints
a ROUGE-L table (overall and by reference length) on the synthetic test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence

from switchkd.config import Config, load_config
from switchkd.evaluate import evaluate
from switchkd.models import load_model, load_tokenizer
from switchkd.train import train

TEACHER = "tiny:gpt2,layers=4,dim=128,heads=4,seed=1"
STUDENT = "tiny:gpt2,layers=2,dim=64,heads=4,seed=2"
COMMON = ["data.train=synthetic", "data.dev=synthetic:dev", "data.max_prompt_length=128", "data.max_length=320",
          "eval.max_prompt_length=128", "eval.max_length=320", "train.warmup_steps=20", "train.log_every=25"]
#: method name -> overrides (the student, data and budget are shared)
METHODS: Dict[str, List[str]] = {
    "sft": ["method.name=sft", "method.kd_ratio=0.0"],
    "kd": ["method.name=kd", "method.divergence=fkl"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("SWITCHKD_CACHE", Path.home() / ".cache" / "switchkd"))


def _budget(quick: bool) -> Dict[str, int]:
    if quick:
        return {"size": 160, "teacher_steps": 30, "student_steps": 10, "test": 14, "batch": 8}
    return {"size": 3000, "teacher_steps": 900, "student_steps": 300, "test": 140, "batch": 16}


def teacher_config(quick: bool) -> Config:
    b = _budget(quick)
    return load_config(None, COMMON + [
        f"model.name={TEACHER}", "method.name=sft", "method.kd_ratio=0.0", f"data.synthetic_size={b['size']}",
        f"train.max_steps={b['teacher_steps']}", f"train.batch_size={b['batch']}", "train.lr=2e-3",
        "eval.limit=40"])


def get_teacher(quick: bool) -> Path:
    """The cached teacher directory, training it on first use."""
    cfg = teacher_config(quick)
    key = hashlib.sha1(json.dumps([TEACHER, _budget(quick), COMMON]).encode()).hexdigest()[:10]
    path = cache_dir() / f"demo-teacher-{key}"
    if (path / "config.json").is_file():
        print(f"teacher: cached at {path}")
        return path
    cfg.output.dir = str(path) + ".run"
    print("teacher: training (cached afterwards)")
    final = train(cfg)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(final, path)
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    return path


def student_config(method: str, teacher: Path, out: Path, quick: bool) -> Config:
    b = _budget(quick)
    return load_config(None, COMMON + METHODS[method] + [
        f"model.name={STUDENT}", f"teacher.name={teacher}", f"data.synthetic_size={b['size']}",
        f"train.max_steps={b['student_steps']}", f"train.batch_size={b['batch']}", "train.lr=2e-3",
        "eval.limit=40", f"output.dir={out / method}"])


def run_demo(out_dir: str = "runs/demo", quick: bool = False, methods: Sequence[str] | None = None) -> Dict[str, dict]:
    """Run the whole demo; returns ``{method: scores}`` and writes ``results.md`` in ``out_dir``."""
    t0 = time.time()
    out = Path(out_dir)
    teacher = get_teacher(quick)
    names = list(methods or METHODS)
    b = _budget(quick)
    eval_cfg = load_config(None, COMMON + [f"eval.limit={b['test']}", "eval.seeds=[10,20,30]"]).eval
    results: Dict[str, dict] = {}
    for name, path in [("teacher", teacher)] + [(m, None) for m in names]:
        if path is None:
            print(f"== {name}")
            path = train(student_config(name, teacher, out, quick))
        tok = load_tokenizer(load_config(None, [f"model.name={path}"]).model)
        model = load_model(load_config(None, [f"model.name={path}"]).model, tok, trainable=False)
        results[name] = evaluate(model, tok, "synthetic:test", eval_cfg, output=out / name / "eval")["results"]["synthetic:test"]
    table = render_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"demo finished in {time.time() - t0:.0f} s; results in {out / 'results.md'}")
    return results


def render_table(results: Dict[str, dict]) -> str:
    """Markdown: ROUGE-L mean +- std over seeds, then one column per length bucket."""
    buckets = list(next(iter(results.values()))["by_length"])
    head = "| method | ROUGE-L | " + " | ".join(f"len {b}" for b in buckets) + " |"
    lines = [head, "|" + "---|" * (2 + len(buckets))]
    for name, r in results.items():
        cells = " | ".join(f"{r['by_length'].get(b, {}).get('rougeL', float('nan')):.1f}" for b in buckets)
        lines.append(f"| {name} | {r['rougeL']:.2f} ± {r['rougeL_std']:.2f} | {cells} |")
    return "\n".join(lines)
