"""``switchkd demo``: every method on the built-in synthetic suite, from one student initialisation.

1. A tiny teacher is trained by SFT on the synthetic train split (cached in ``$SWITCHKD_CACHE``).
2. A student a few times smaller is warm-started by a short SFT run (cached): the shared
   initialisation, so on-policy methods start from a student that already ends its answers.
3. Each method continues from it for the same number of steps; each student and the teacher
   are scored on the test split (sampled, several seeds): ROUGE-L overall and by length.
4. ``report.md`` with the table and PNG plots is written to the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from switchkd.config import load_config, preset_method
from switchkd.evaluate import score_examples
from switchkd.models import load_model, load_tokenizer
from switchkd.train import train

TEACHER = "tiny:gpt2,layers=4,dim=128,heads=4,seed=1"
STUDENT = "tiny:gpt2,layers=2,dim=64,heads=4,seed=2"
COMMON = ["data.train=synthetic", "data.dev=synthetic:dev", "data.max_prompt_length=128", "data.max_length=320",
          "eval.max_prompt_length=128", "eval.max_length=320", "train.log_every=10", "method.max_new_tokens=160"]
#: method name -> the ``method`` section of its preset ``configs/tiny/<name>.yaml``, laid over COMMON
#: (student, teacher, data and budget are the demo's, shared by all methods)
METHODS: Dict[str, List[str]] = {name: preset_method(f"tiny/{name}")
                                 for name in ("sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "bild", "switch")}


@dataclass(frozen=True)
class Budget:
    size: int = 4000  # synthetic train examples
    teacher_steps: int = 800
    init_steps: int = 400  # shared student warm start
    student_steps: int = 60
    batch: int = 16
    test: int = 112
    seeds: tuple = (10, 20)
    eval_every: int = 20
    dev: int = 40  # dev prompts for keep-best during training


QUICK = Budget(size=200, teacher_steps=30, init_steps=10, student_steps=4, batch=8, test=14, seeds=(10,), eval_every=2,
               dev=4)


def cache_dir() -> Path:
    return Path(os.environ.get("SWITCHKD_CACHE", Path.home() / ".cache" / "switchkd"))


def _cached_sft(name: str, spec: str, steps: int, lr: float, b: Budget) -> Path:
    """Train ``spec`` by SFT on the synthetic suite once; later calls reuse the cached directory."""
    key = hashlib.sha1(json.dumps([spec, steps, lr, asdict(b)["size"], b.batch, COMMON]).encode()).hexdigest()[:10]
    path = cache_dir() / f"demo-{name}-{key}"
    if (path / "config.json").is_file():
        print(f"{name}: cached at {path}")
        return path
    print(f"{name}: training ({steps} steps; cached afterwards)")
    run = Path(str(path) + ".run")
    cfg = load_config(None, COMMON + [
        f"model.name={spec}", "method.name=sft", "method.kd_ratio=0.0", f"data.synthetic_size={b.size}",
        f"train.max_steps={steps}", f"train.batch_size={b.batch}", f"train.lr={lr}", "train.warmup_steps=30",
        "train.keep_best=false", "data.dev=null", f"output.dir={run}", "output.overwrite=true"])
    final = train(cfg)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(final, path)
    shutil.rmtree(run, ignore_errors=True)
    return path


def prepare(b: Budget) -> tuple[Path, Path]:
    """The cached teacher and the cached shared student initialisation."""
    return (_cached_sft("teacher", TEACHER, b.teacher_steps, 2.5e-3, b),
            _cached_sft("student-init", STUDENT, b.init_steps, 2e-3, b))


def train_method(method: str, teacher: Path, init: Path, out: Path, b: Budget, seed: int = 1,
                 extra: Sequence[str] = ()) -> Path:
    """Distil from ``init`` with ``method``; returns the final model directory."""
    cfg = load_config(None, COMMON + METHODS[method] + ["method.max_new_tokens=160",
        f"model.name={init}", f"teacher.name={teacher}", f"data.synthetic_size={b.size}", f"data.seed={seed}",
        f"train.max_steps={b.student_steps}", f"train.batch_size={b.batch}", "train.lr=1e-3", f"train.seed={seed}",
        "train.warmup_steps=0", f"train.eval_every={b.eval_every}", f"eval.limit={b.dev}", f"output.dir={out}", "output.overwrite=true", *extra])
    return train(cfg)


def score(model_dir: Path, b: Budget, split: str = "test", seeds: Optional[Sequence[int]] = None) -> dict:
    """ROUGE-L (sampled, ``seeds``) on a synthetic split; the ``score_examples`` dict."""
    mc = load_config(None, [f"model.name={model_dir}"]).model
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False)
    ecfg = load_config(None, COMMON + [f"eval.seeds={list(seeds or b.seeds)}", "eval.batch_size=56"]).eval
    from switchkd.synthetic import make_split

    return score_examples(model, tok, make_split(split, b.test), ecfg, name=f"synthetic:{split}")[0]


def write_report(out: Path, results: Dict[str, List[dict]], switch_metrics: Optional[Path], header: str) -> Path:
    """``report.md`` with the table and the plots (PNG, when matplotlib is installed)."""
    from switchkd.report import method_table, plot_by_length, plot_switch_profile, switch_profile

    out.mkdir(parents=True, exist_ok=True)
    parts = [header, "", method_table(results), ""]
    if plot_by_length(results, out / "rouge_by_length.png"):
        parts += ["![ROUGE-L by response length](rouge_by_length.png)", ""]
    if switch_metrics is not None and switch_metrics.is_file():
        prof = switch_profile(switch_metrics)
        if plot_switch_profile(prof, out / "switch_profile.png"):
            parts += ["![SWITCH teacher-token rate and gate by position](switch_profile.png)", ""]
        rows = ["| positions | teacher-written share | mean gate |", "|---|---:|---:|"]
        rows += [f"| {k} | {v:.3f} | {prof['gate'].get(k, float('nan')):.4f} |" for k, v in prof["teacher_frac"].items()]
        parts += ["SWITCH during training (mean over logged steps):", "", *rows, ""]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def run_demo(out_dir: str = "runs/demo", quick: bool = False, methods: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Run the whole demo; returns ``{name: scores}`` and writes ``report.md`` in ``out_dir``."""
    t0, b, out = time.time(), (QUICK if quick else Budget()), Path(out_dir)
    teacher, init = prepare(b)
    names = list(methods or METHODS)
    results: Dict[str, List[dict]] = {"teacher": [score(teacher, b)], "init": [score(init, b)]}
    for name in names:
        print(f"== {name}")
        results[name] = [score(train_method(name, teacher, init, out / name, b), b)]
    header = (f"# switchkd demo\n\nSynthetic suite, test split ({b.test} prompts), sampled at temperature 1 with "
              f"seeds {list(b.seeds)}; ± is the standard deviation over seeds. Teacher `{TEACHER}` "
              f"({b.teacher_steps} SFT steps); students `{STUDENT}` warm-started by {b.init_steps} SFT steps "
              f"(`init`), then {b.student_steps} steps of each method (batch {b.batch}). Run time "
              f"{time.time() - t0:.0f} s.")
    report = write_report(out, results, out / "switch/metrics.jsonl" if "switch" in names else None, header)
    from switchkd.report import method_table

    print(method_table(results))
    print(f"demo finished in {time.time() - t0:.0f} s; report: {report}")
    return {k: v[0] for k, v in results.items()}
