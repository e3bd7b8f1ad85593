"""Distillation across vocabularies: a byte-level teacher and SmolLM2-135M-Instruct into GPT-2-BPE students.
(``make bench-cross``)

``--pair demo`` (default):

Setting: the demo's shipped teacher (a byte-level vocabulary, 4 layers, trained on the synthetic suite)
and a student with GPT-2's BPE tokenizer (``../shared/data/gpt2_tokenizer``, 50,257 tokens): a 2-layer,
64-wide GPT-2 with random weights, the same initialisation for every method.  Each method trains the same
number of optimizer steps on the same data: SFT (no teacher), KD with GOLD's hybrid loss
(``method.cross_tokenizer=gold``) and KD with ULD (``uld``), each alone (``kd_ratio`` 1) and mixed half and
half with the student's CE (``+ce``, as the ULD paper trains); GKD (student samples, GOLD) with ``--gkd``.
Scores: ROUGE-L on the synthetic test split (sampled, the demo's seeds); "gap closed" is the share of the
teacher - init gap each method recovers.  Writes ``results.json`` and prints a Markdown table.

``--pair real``: the real teacher of ``bench/real.py`` (SmolLM2-135M-Instruct, 49,152-token byte-level BPE,
ChatML) into its 10-block cut with the vocabulary replaced by GPT-2's (50,257 tokens; :func:`transplant`:
each GPT-2 token's embedding is the mean of the teacher's embeddings of the tokens spelling the same bytes).
``sft-init``: SFT on Dolly from the transplanted cut; then SFT (continued), KD, SeqKD, GKD and SWITCH with
their ``configs/smollm2`` presets across vocabularies (GOLD's hybrid loss) for the same steps, scored on the
five sets as ``bench/real.py`` does.  Before SWITCH trains, its cross gate is chosen by measurement: each
gate at a constant threshold calibrated to the same teacher share (25%) on Dolly dev prompts, its greedy
rollouts of 32 other dev prompts scored by ROUGE-L and compared prompt by prompt with a control that draws
the writer at random with that share; the gate furthest above the control trains (its tau0 calibrated again
for the preset's exponential schedule).  Writes ``results.json`` and ``report.md`` into ``--out``.

    python bench/cross_tokenizer.py [--steps 200] [--seeds 1] [--gkd] [--smoke] [--out runs/bench-cross]
    SWITCHKD_CACHE=<cache> python bench/cross_tokenizer.py --pair real [--smoke] [--out runs/bench-cross-real]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, List

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


def _spelled(vocab: Any, data: bytes, eos: int) -> List[int]:
    """The ids spelling ``data`` in ``vocab`` (``[eos]`` for no bytes, or bytes it has no tokens for)."""
    from switchkd.interleave import Unspellable

    try:
        return vocab.encode(data) if data else [eos]
    except Unspellable:
        return [eos]


def transplant(src: Path, tokenizer_dir: Path, out: Path) -> Path:
    """``src`` with its vocabulary replaced by the tokenizer at ``tokenizer_dir`` (saved to ``out``, reused): each new
    token's input and output embedding is the mean of ``src``'s rows for the tokens spelling the same bytes (zero-
    width and special tokens: ``src``'s EOS row); ``src``'s chat template is kept, the new EOS pads."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.align import token_bytes
    from switchkd.interleave import Vocab

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    old, new = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spell, eos = Vocab(old), old.eos_token_id
    rows = [_spelled(spell, b, eos) for b in token_bytes(new)]
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        if not model.config.tie_word_embeddings:
            tables.append(model.get_output_embeddings().weight)
        means = [torch.stack([w[r].mean(0) for r in rows]) for w in tables]
        model.resize_token_embeddings(len(new))
        model.get_input_embeddings().weight.copy_(means[0])
        if len(means) > 1:
            model.get_output_embeddings().weight.copy_(means[1])
    new.pad_token = new.eos_token
    new.chat_template = old.chat_template
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.config, key, new.eos_token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, key, new.eos_token_id)
    model.config.vocab_size = len(new)
    model.save_pretrained(out)
    new.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=["demo", "real"], default="demo")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--gkd", action="store_true", help="also GKD across vocabularies (student rollouts)")
    ap.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--smoke", action="store_true", help="a few steps, a few test prompts")
    ap.add_argument("--out", help="default: runs/bench-cross (demo pair), runs/bench-cross-real (real pair)")
    a = ap.parse_args()
    if a.pair == "real":
        from cross_real import main as real_main  # bench/cross_real.py

        return real_main(a)
    t0, out = time.time(), Path(a.out or "runs/bench-cross")
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
