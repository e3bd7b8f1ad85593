"""Benchmark 3 of issue 5: one epoch of SFT vs online KD vs KD from the cached teacher top-k.

Tiny random GPT-2 models with the real GPT-2 tokenizer (vocab 50257, from ../shared): teacher
6 layers d=256, student 2 layers d=128; Dolly train prompts from ../shared (MiniLLM format),
batch 8, max length 256.  The cache is built once (its time is reported separately: it is paid
once for any number of epochs).  Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from switchkd.config import load_config
from switchkd.teacher_cache import build_cache
from switchkd.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared"


def save_model(path: Path, layers: int, dim: int, seed: int, tok: GPT2TokenizerFast) -> Path:
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=dim, n_layer=layers, n_head=max(2, dim // 64),
                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        GPT2LMHeadModel(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def gpt2_pair(out: Path) -> tuple[GPT2TokenizerFast, Path, Path]:
    """The GPT-2 tokenizer and the benchmark's tiny random teacher (6 x 256) and student (2 x 128)."""
    tok = GPT2TokenizerFast.from_pretrained(SHARED / "data/gpt2_tokenizer")
    return tok, save_model(out / "teacher", 6, 256, 1, tok), save_model(out / "student", 2, 128, 2, tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--out", default="runs/bench-epoch")
    args = p.parse_args()
    out = Path(args.out)
    _, teacher, student = gpt2_pair(out)
    common = [f"model.name={student}", f"teacher.name={teacher}", f"data.train={SHARED}/data/minillm_data/dolly/train.jsonl",
              f"data.limit={args.examples}", "data.max_prompt_length=128", "data.max_length=256", "data.dev=null",
              "train.batch_size=8", "train.epochs=1", "train.log_every=1000", "train.keep_best=false"]
    t0 = time.perf_counter()
    build_cache(load_config(None, common + ["method.name=kd", "method.divergence=fkl"]), out / "cache", k=args.k)
    print(json.dumps({"variant": "build cache (once)", "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    variants = {"sft": ["method.name=sft", "method.kd_ratio=0"],
                "online KD (fkl)": ["method.name=kd", "method.divergence=fkl"],
                f"cached top-{args.k} KD (fkl, sparse)": ["method.name=kd", "method.divergence=fkl",
                                                                      f"method.teacher_cache={out / 'cache'}"],
                f"cached top-{args.k} KL": ["method.name=kd", "method.divergence=topk_kl", f"method.params.k={args.k}",
                                            f"method.teacher_cache={out / 'cache'}"]}
    times = {}
    for i, (name, over) in enumerate(variants.items()):
        t0 = time.perf_counter()
        train(load_config(None, common + over + [f"output.dir={out / f'run{i}'}", "output.overwrite=true"]))
        times[name] = time.perf_counter() - t0
        print(json.dumps({"variant": name, "epoch_s": round(times[name], 2),
                          "over_sft": round(times[name] / times["sft"], 2)}), flush=True)


if __name__ == "__main__":
    main()
