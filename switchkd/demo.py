"""``switchkd demo``: distillation on the built-in synthetic suite in a few CPU minutes.

1. The teacher ships with the package (``switchkd/demo_models/teacher``: a 4-layer, 128-wide GPT-2
   trained by SFT on the synthetic suite; ``scripts/build_demo_teacher.py`` rebuilds it; its SHA-256
   is checked before use).
2. The student is the teacher with half its decoder blocks dropped (blocks 0 and 3 kept, the
   DistilBERT initialisation; :func:`switchkd.models.drop_layers`): the shared initialisation ``init``.
3. Each method (the presets ``configs/demo.yaml`` names) continues from it for the same number of
   steps; the students, ``init`` and the teacher are scored on the test split (sampled, two seeds).
   Tasks run in two worker processes (one thread each) on a multi-core CPU.
4. ``report.md``: the table (± the standard deviation over sampling seeds), one "closes X% of the gap"
   line per method, ROUGE-L by length and, for an interleaved source, its teacher-token profile (PNG).

The benchmarks (``bench/quality.py``) use :func:`prepare`: the same teacher and a warm-started student
of a smaller shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from switchkd.config import PRESET_DIR, ConfigError, load_config, preset_method
from switchkd.evaluate import score_examples
from switchkd.models import load_model, load_tokenizer
from switchkd.train import train

TEACHER = "tiny:gpt2,layers=4,dim=128,heads=4,seed=1"
STUDENT = "tiny:gpt2,layers=2,dim=64,heads=4,seed=2"
COMMON = ["data.train=synthetic", "data.dev=synthetic:dev", "data.max_prompt_length=128", "data.max_length=320",
          "eval.max_prompt_length=128", "eval.max_length=320", "train.log_every=10", "method.max_new_tokens=160"]
DEMO_FILE = PRESET_DIR / "demo.yaml"  # the default methods and the per-preset overrides


def _demo_file() -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(DEMO_FILE)) or {}  # type: ignore[return-value]


#: preset name -> the ``method`` section of ``configs/tiny/<name>.yaml`` (+ the demo's overrides for it),
#: laid over COMMON (student, teacher, data and budget are the demo's, shared by all methods)
METHODS: Dict[str, List[str]] = {p.stem: preset_method(f"tiny/{p.stem}") + list(_demo_file()["overrides"].get(p.stem, []))
                                 for p in sorted((PRESET_DIR / "tiny").glob("*.yaml")) if not p.name.startswith("_")}
DEFAULT_METHODS = tuple(_demo_file()["methods"])  # --methods picks others


#: what the demo writes into its output directory (a rerun replaces these, and nothing else is allowed there)
OUTPUTS = ("logs", "report.md", "rouge_by_length.png", "teacher_share.png")


def check_output(out: "str | Path") -> Path:
    """The demo's output directory: new, or holding an earlier demo's files only; one-line errors otherwise."""
    from switchkd.rundir import check_output_path

    return check_output_path(out, "--output", "dir", reusable=(*OUTPUTS, *METHODS))


def listed(key: str) -> List[str]:
    """A preset list of ``configs/demo.yaml`` (``decoding``, ``reads_dev_loss``, ``teacher_share``)."""
    return list(_demo_file().get(key, []))
SHIPPED = Path(__file__).resolve().parent / "demo_models" / "teacher"
KEEP = (0, 3)  # the teacher's blocks the demo student keeps


@dataclass(frozen=True)
class Budget:
    size: int = 4000  # synthetic train examples
    teacher_steps: int = 800
    init_steps: int = 400  # benchmarks: the warm-started student's SFT steps
    student_steps: int = 60
    batch: int = 16
    test: int = 112
    seeds: tuple = (10, 20)
    eval_every: int = 20
    dev: int = 40  # dev prompts for keep-best during training
    lr: float = 1e-3


DEMO = Budget(student_steps=50, test=192, eval_every=0)  # no dev evaluation while training
QUICK = Budget(size=200, teacher_steps=30, init_steps=10, student_steps=4, batch=8, test=14, seeds=(10,), eval_every=2,
               dev=4)


def cache_dir() -> Path:
    return Path(os.environ.get("SWITCHKD_CACHE", Path.home() / ".cache" / "switchkd"))


def shipped_teacher() -> Path:
    """The packaged demo teacher, after checking its weights against ``SHA256``."""
    want = (SHIPPED / "SHA256").read_text().split()[0] if (SHIPPED / "SHA256").is_file() else None
    weights = SHIPPED / "model.safetensors"
    if want is None or not weights.is_file() or hashlib.sha256(weights.read_bytes()).hexdigest() != want:
        raise ConfigError(f"{SHIPPED}: the demo teacher is missing or its checksum differs; rebuild it with "
                           "python scripts/build_demo_teacher.py")
    return SHIPPED


def sft_overrides(spec: str, steps: int, lr: float, b: Budget) -> List[str]:
    """The config of an SFT run of ``spec`` on the synthetic suite (the demo teacher's recipe with
    ``TEACHER``, 800 steps, lr 2.5e-3 and the default budget; ``scripts/build_demo_teacher.py``)."""
    return COMMON + [f"model.name={spec}", "method.kd_ratio=0.0", f"data.synthetic_size={b.size}",
                     f"train.max_steps={steps}", f"train.batch_size={b.batch}", f"train.lr={lr}", "train.warmup_steps=30",
                     "train.keep_best=false", "data.dev=null"]


def _cached_sft(name: str, spec: str, steps: int, lr: float, b: Budget) -> Path:
    """Train ``spec`` by SFT on the synthetic suite once; later calls reuse the cached directory."""
    key = hashlib.sha1(json.dumps([spec, steps, lr, asdict(b)["size"], b.batch, COMMON]).encode()).hexdigest()[:10]
    path = cache_dir() / f"demo-{name}-{key}"
    if (path / "config.json").is_file():
        print(f"{name}: cached at {path}")
        return path
    print(f"{name}: training ({steps} steps; cached afterwards)")
    run = Path(str(path) + ".run")
    final = train(load_config(None, sft_overrides(spec, steps, lr, b) + [f"output.dir={run}", "output.overwrite=true"]))
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(final, path)
    shutil.rmtree(run, ignore_errors=True)
    return path


def teacher_for(b: Budget) -> Path:
    """The shipped teacher when ``b`` asks for its recipe (800 steps, 4,000 examples, batch 16), else
    one trained and cached."""
    if (b.teacher_steps, b.size, b.batch) == (800, 4000, 16):
        return shipped_teacher()
    return _cached_sft("teacher", TEACHER, b.teacher_steps, 2.5e-3, b)


def prepare(b: Budget) -> tuple[Path, Path]:
    """Benchmarks: the teacher and a warm-started ``STUDENT`` (SFT, cached) as the shared initialisation."""
    return teacher_for(b), _cached_sft("student-init", STUDENT, b.init_steps, 2e-3, b)


def layer_dropped_init(teacher: Path) -> Path:
    """The demo student: the teacher's blocks ``KEEP`` (cached by the teacher's checksum)."""
    from switchkd.models import drop_layers

    digest = hashlib.sha1((teacher / "model.safetensors").read_bytes()).hexdigest()[:10]
    path = cache_dir() / f"demo-init-{'-'.join(map(str, KEEP))}-{digest}"
    if not (path / "config.json").is_file():
        tmp = Path(str(path) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        drop_layers(str(teacher), KEEP, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def train_method(method: str, teacher: Path, init: Path, out: Path, b: Budget, seed: int = 1,
                 extra: Sequence[str] = ()) -> Path:
    """Distil from ``init`` with ``method``; returns the final model directory."""
    # a source whose schedule reads the dev loss gets an evaluation at least every 10 steps
    every = max(b.eval_every, 10) if method in listed("reads_dev_loss") else b.eval_every
    cfg = load_config(None, COMMON + METHODS[method] + ["method.max_new_tokens=160",
        f"model.name={init}", f"teacher.name={teacher}", f"data.synthetic_size={b.size}", f"data.seed={seed}",
        f"train.max_steps={b.student_steps}", f"train.batch_size={b.batch}", f"train.lr={b.lr}", f"train.seed={seed}",
        "train.warmup_steps=0", f"train.eval_every={every}", f"eval.limit={b.dev}", f"output.dir={out}",
        "output.overwrite=true", *extra])
    return train(cfg)


def score(model_dir: Path, b: Budget, split: str = "test", seeds: Optional[Sequence[int]] = None) -> dict:
    """ROUGE-L (sampled, ``seeds``) on a synthetic split; the ``score_examples`` dict."""
    mc = load_config(None, [f"model.name={model_dir}"]).model
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False)
    ecfg = load_config(None, COMMON + [f"eval.seeds={list(seeds or b.seeds)}", "eval.batch_size=56"]).eval
    from switchkd.synthetic import make_split

    return score_examples(model, tok, make_split(split, b.test), ecfg, name=f"synthetic:{split}")[0]


def _task(kind: str, name: str, teacher: Path, init: Path, out: Path, b: Budget, threads: int, seed: int = 1,
          extra: Sequence[str] = (), tag: str = "", reuse: bool = False) -> tuple[str, dict, float]:
    """One task in a worker: score a model (``kind="score"``) or train (``seed``, ``extra`` overrides)
    and score a method (``reuse``: a finished ``final/`` is scored again, not retrained); its output goes
    to ``out/logs/<name><tag>.log``.  The benchmarks use it too."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{name}{tag}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        run = out / f"{name}{tag}"
        if kind == "score":
            model = {"teacher": teacher, "init": init}[name]
        elif reuse and (run / "final" / "config.json").is_file():
            model = run / "final"
        else:
            model = train_method(name, teacher, init, run, b, seed=seed, extra=extra)
        result = score(model, b)
    return name, result, time.time() - t0


def run_tasks(calls: List[Dict[str, Any]], workers: int, fn: Optional[Callable[..., Any]] = None) -> Iterator[Any]:
    """``fn`` (default :func:`_task`; a picklable module-level function taking ``threads``) for each dict
    of its keyword arguments (all but ``threads``), results in the order given: in this process
    (``workers=1``) or in ``workers`` spawned processes of ``cores // workers`` threads each (small models
    are bound by Python overhead, so processes beat threads)."""
    fn = fn or _task
    if workers == 1:
        for call in calls:
            yield fn(**call, threads=0)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for future in [pool.submit(fn, **call, threads=threads) for call in calls]:
            yield future.result()


def gap_lines(results: Dict[str, dict]) -> List[str]:
    """One line per method: ROUGE-L ± sd over seeds and the share of the init-to-teacher gap it closes."""
    t, i = results["teacher"]["rougeL"], results["init"]["rougeL"]
    lines = [f"teacher {t:.1f}, init (the student before distillation) {i:.1f}: gap {t - i:.1f} ROUGE-L"]
    for name, r in results.items():
        if name not in ("teacher", "init"):
            share = 100 * (r["rougeL"] - i) / (t - i) if t != i else float("nan")
            lines.append(f"{name}: {r['rougeL']:.1f} ± {r.get('rougeL_std', 0.0):.1f} — closes {share:.0f}% of the gap")
    noise = max(r.get("rougeL_std", 0.0) for r in results.values())
    lines.append(f"sampling noise: the largest standard deviation over seeds is {noise:.1f} ROUGE-L")
    return lines + [noise_line(results, noise)]


def noise_line(results: Dict[str, dict], noise: float) -> str:
    """Which differences between methods (and the init) exceed twice the sampling noise, best first."""
    names = sorted((n for n in results if n != "teacher"), key=lambda n: -results[n]["rougeL"])
    clear, close = [], 0
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            d = results[a]["rougeL"] - results[b]["rougeL"]
            if d > 2 * noise:
                clear.append(f"{a} > {b} (+{d:.1f})")
            else:
                close += 1
    return (f"beyond twice the sampling noise ({2 * noise:.1f}): " + ("; ".join(clear) or "none")
            + (f"; {close} other pair(s) within it" if close else ""))


def write_report(out: Path, results: Dict[str, List[dict]], profile_metrics: Optional[Path], header: str) -> Path:
    """``report.md`` with the table and the plots (PNG, when matplotlib is installed)."""
    from switchkd.report import method_table, plot_by_length, plot_teacher_share, teacher_share_profile

    out.mkdir(parents=True, exist_ok=True)
    parts = [header, "", method_table(results), ""]
    if plot_by_length(results, out / "rouge_by_length.png", (listed("teacher_share") or [None])[0]):
        parts += ["![ROUGE-L by response length](rouge_by_length.png)", ""]
    if profile_metrics is not None and profile_metrics.is_file():
        prof = teacher_share_profile(profile_metrics)
        if plot_teacher_share(prof, out / "teacher_share.png"):
            parts += [f"![{profile_metrics.parent.name}: teacher-written share and gate by position](teacher_share.png)", ""]
        rows = ["| positions | teacher-written share | mean gate |", "|---|---:|---:|"]
        rows += [f"| {k} | {v:.3f} | {prof['gate'].get(k, float('nan')):.4f} |" for k, v in prof["teacher_frac"].items()]
        parts += [f"{profile_metrics.parent.name} during training (mean over logged steps):", "", *rows, ""]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def run_demo(out_dir: str = "runs/demo", quick: bool = False, methods: Optional[Sequence[str]] = None,
             workers: Optional[int] = None) -> Dict[str, dict]:
    """Run the whole demo; returns ``{name: scores}`` and writes ``report.md`` in ``out_dir``."""
    t0, b, out = time.time(), (QUICK if quick else DEMO), Path(out_dir)
    names = list(methods or DEFAULT_METHODS)
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"unknown demo method {bad[0]!r}; choose from {', '.join(METHODS)}")
    check_output(out)
    teacher = shipped_teacher()
    init = layer_dropped_init(teacher)
    workers = workers or min(2, os.cpu_count() or 1)
    tasks = [("method", m) for m in sorted(names, key=lambda m: m not in listed("decoding"))]  # the slow ones first
    tasks += [("score", "teacher"), ("score", "init")]
    print(f"demo: teacher {SHIPPED.name} (shipped), student = its blocks {list(KEEP)}; methods {', '.join(names)}; "
          f"{b.student_steps} steps each, {workers} worker process(es); logs in {out / 'logs'}")
    results: Dict[str, dict] = {}
    calls = [dict(kind=k, name=n, teacher=teacher, init=init, out=out, b=b) for k, n in tasks]
    for name, result, seconds in run_tasks(calls, workers):
        results[name] = result
        print(f"  {name}: ROUGE-L {result['rougeL']:.1f} ({seconds:.0f} s)", flush=True)
    ordered = {k: results[k] for k in ["teacher", "init", *names]}
    lines = gap_lines(ordered)
    header = (f"# switchkd demo\n\nSynthetic suite, test split ({b.test} prompts), sampled at temperature 1 with "
              f"seeds {list(b.seeds)}; ± in the table is the standard deviation over those seeds. Teacher: the shipped "
              f"`{TEACHER}` (800 supervised steps); student (`init`): the teacher's blocks {list(KEEP)} of 4 (half its "
              f"layers), then {b.student_steps} steps of each method (batch {b.batch}, lr {b.lr}). "
              f"Run time {time.time() - t0:.0f} s.\n\n" + "\n".join(f"- {x}" for x in lines))
    profiled = [m for m in listed("teacher_share") if m in names]
    report = write_report(out, {k: [v] for k, v in ordered.items()},
                          out / profiled[0] / "metrics.jsonl" if profiled else None, header)
    from switchkd.report import method_table

    print(method_table({k: [v] for k, v in ordered.items()}))
    print("\n".join(lines))
    print(f"demo finished in {time.time() - t0:.0f} s; report: {report}")
    return ordered
