"""A/B of the rollout engine between two checkouts of switchkd (same models, prompts and tau0, so the
same tokens): run it once per checkout, nothing else running, and compare the printed seconds.

    python bench/engine_ab.py --checkout /path/to/old/checkout --label old
    python bench/engine_ab.py --checkout . --label new

GPT-2 teacher 6x256 and student 2x128 (random), batch 8, prompt 64, 128 new tokens, EOS disabled,
greedy, constant tau0 from quantiles of a student-only probe's gates; best of 2 per rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def model(vocab: int, layers: int, dim: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=dim, n_layer=layers, n_head=max(2, dim // 64),
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, help="the switchkd checkout whose engine is timed")
    p.add_argument("--label", required=True)
    p.add_argument("--vocabs", type=int, nargs="+", default=[50257, 512])
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.47])
    args = p.parse_args()
    sys.path.insert(0, args.checkout)
    from switchkd.rollout import Gate, RolloutConfig, rollout

    for V in args.vocabs:
        teacher, student = model(V, 6, 256, 1), model(V, 2, 128, 2)
        torch.manual_seed(0)
        ids = torch.randint(3, V, (8, 64))
        mask = torch.ones_like(ids)
        base = dict(max_new_tokens=128, do_sample=False, eos_token_id=[V + 1], pad_token_id=0, vocab_size=V)
        probe = rollout(student, teacher, ids, mask, RolloutConfig(**base, speculative=False),
                        Gate(tau0=float("inf"), schedule="const"))
        gates = probe.gate[probe.response_mask]
        for q in args.quantiles:
            for spec in (False, True):
                cfg, gate = RolloutConfig(**base, speculative=spec), Gate(tau0=float(gates.quantile(q)), schedule="const")
                out = rollout(student, teacher, ids, mask, cfg, gate)
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    rollout(student, teacher, ids, mask, cfg, gate)
                    times.append(time.perf_counter() - t0)
                print(json.dumps({"code": args.label, "vocab": V, "quantile": q, "speculative": spec,
                                  "share": round(float(out.from_teacher.float().mean()), 3), "s": round(min(times), 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
