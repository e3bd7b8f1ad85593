"""Distillation across vocabularies: the demo's byte-level teacher into a GPT-2-BPE student.  (``make bench-cross``)

Setting: the demo's shipped teacher (a byte-level vocabulary, 4 layers, trained on the synthetic suite)
and a student with GPT-2's BPE tokenizer (``../shared/data/gpt2_tokenizer``, 50,257 tokens): a 2-layer,
64-wide GPT-2 with random weights, the same initialisation for every method.  Each method trains the same
number of optimizer steps on the same data: SFT (no teacher), KD with GOLD's hybrid loss
(``method.cross_tokenizer=gold``) and KD with ULD (``uld``), each alone (``kd_ratio`` 1) and mixed half and
half with the student's CE (``+ce``, as the ULD paper trains); GKD (student samples, GOLD) with ``--gkd``.
Scores: ROUGE-L on the synthetic test split (sampled, the demo's seeds); "gap closed" is the share of the
teacher - init gap each method recovers.  Writes ``results.json`` and prints a Markdown table.

    python bench/cross_tokenizer.py [--steps 200] [--seeds 1] [--gkd] [--smoke] [--out runs/bench-cross]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switchkd import demo  # noqa: E402
from switchkd.config import load_config  # noqa: E402
from switchkd.train import train  # noqa: E402

SHARED = ROOT.parent / "shared"
METHODS = {
    "sft": ["method.source=dataset", "method.divergence=ce", "method.kd_ratio=0.0", "teacher=null"],
    "kd-gold": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=1.0", "method.cross_tokenizer=gold"],
    "kd-uld": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=1.0", "method.cross_tokenizer=uld"],
    "kd-gold+ce": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=0.5",
                   "method.cross_tokenizer=gold"],
    "kd-uld+ce": ["method.source=dataset", "method.divergence=fkl", "method.kd_ratio=0.5", "method.cross_tokenizer=uld"],
    "gkd-gold": ["method.source=mixture", "method.mixture.student_ratio=0.5", "method.divergence=jsd",
                 "method.params.beta=0.5", "method.cross_tokenizer=gold"],
}


def bpe_init(out: Path) -> Path:
    """The GPT-2-BPE student's random initialisation (saved once)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(SHARED / "data/gpt2_tokenizer"))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(method: str, teacher: Path, init: Path, out: Path, b: demo.Budget, steps: int, seed: int) -> Path:
    run_dir = out / f"{method}@{seed}"
    if (run_dir / "final/config.json").is_file():
        return run_dir / "final"
    cfg = load_config(None, demo.COMMON + METHODS[method] + [
        f"model.name={init}", f"teacher.name={teacher}", f"data.synthetic_size={b.size}", f"data.seed={seed}",
        f"train.max_steps={steps}", f"train.batch_size={b.batch}", f"train.lr={b.lr}", f"train.seed={seed}",
        "train.warmup_steps=0", "train.eval_every=0", "data.dev=null", f"output.dir={run_dir}", "output.overwrite=true"])
    return train(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--gkd", action="store_true", help="also GKD across vocabularies (student rollouts)")
    ap.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--smoke", action="store_true", help="a few steps, a few test prompts")
    ap.add_argument("--out", default="runs/bench-cross")
    a = ap.parse_args()
    t0, out = time.time(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = replace(demo.DEMO, test=112)
    steps = a.steps
    if a.smoke:
        b, steps = replace(demo.QUICK, test=8), 2
    teacher, init = demo.shipped_teacher(), bpe_init(out / "bpe-init")
    methods = a.methods.split(",") if a.methods else [m for m in METHODS if m != "gkd-gold" or a.gkd]
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, path in (("teacher", teacher), ("init", init)):
        results[name] = results.get(name) or demo.score(path, b)
    for seed in a.seeds:
        for m in methods:
            if f"{m}@{seed}" in results and not a.smoke:
                continue
            t = time.time()
            final = run(m, teacher, init, out, b, steps, seed)
            results[f"{m}@{seed}"] = demo.score(final, b) | {"train_s": time.time() - t}
            cache.write_text(json.dumps(results, indent=1))
            print(f"{m} seed {seed}: ROUGE-L {results[f'{m}@{seed}']['rougeL']:.2f} ({time.time() - t:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    t_score, i_score = results["teacher"]["rougeL"], results["init"]["rougeL"]
    print(f"\n| model | ROUGE-L | gap closed |\n|---|---:|---:|\n| teacher (byte-level) | {t_score:.2f} | |\n"
          f"| init (GPT-2 BPE, random) | {i_score:.2f} | |")
    for key, r in results.items():
        if "@" in key:
            gap = (r["rougeL"] - i_score) / max(t_score - i_score, 1e-9)
            print(f"| {key} | {r['rougeL']:.2f} | {100 * gap:.0f}% |")
    print(f"\n{steps} steps per method, batch {b.batch}, lr {b.lr}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
