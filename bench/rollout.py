"""Benchmark 1: SWITCH rollout cost on the CPU, lockstep vs speculative vs the on-policy floor.

Tiny random models (teacher 6 layers d=256, student 2 layers d=128; GPT-2, and Llama with GQA),
batch 8, prompt 64, vocab 50257 and 512, 128 and 256 new tokens.  The floor is what a plain
on-policy (GKD) step must spend on sequences: student ``generate`` plus one teacher forward over
the result.  tau0 (constant schedule) is found by bisection on the *measured* teacher share
(:func:`switchkd.calibrate.calibrate_tau0`) for about 10%, 30% and 53%; the measured share and the
teacher forwards per generated token are reported.  EOS is disabled so every row decodes the full
length.  Prints one JSON line per configuration and a summary line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from switchkd.calibrate import calibrate_tau0
from switchkd.rollout import Gate, RolloutConfig, rollout


def model(vocab: int, layers: int, dim: int, seed: int, arch: str = "gpt2") -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=512)).eval()
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=dim, n_layer=layers, n_head=max(2, dim // 64),
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocabs", type=int, nargs="+", default=[50257, 512])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 256])
    p.add_argument("--shares", type=float, nargs="+", default=[0.10, 0.30, 0.53])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--archs", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    args = p.parse_args()
    rows = []
    for arch, vocab in [(a, v) for a in args.archs for v in args.vocabs if a == "gpt2" or v < 1000]:
        teacher, student = model(vocab, 6, 256, 1, arch), model(vocab, 2, 128, 2, arch)
        torch.manual_seed(0)
        ids = torch.randint(3, vocab, (args.batch, args.prompt))
        mask = torch.ones_like(ids)
        for n in args.new_tokens:
            base = dict(max_new_tokens=n, do_sample=False, eos_token_id=[vocab + 1], pad_token_id=0, vocab_size=vocab)

            def floor():
                seq = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)
                with torch.no_grad():
                    teacher(input_ids=seq)

            t_floor = timed(floor, args.repeats)
            for share in args.shares:
                tau0, _ = calibrate_tau0(student, teacher, ids, mask, RolloutConfig(**base, speculative=True),
                                         Gate(schedule="const"), share, iters=8)
                res = {}
                for spec in (False, True):
                    cfg, gate = RolloutConfig(**base, speculative=spec), Gate(tau0=tau0, schedule="const")
                    out = rollout(student, teacher, ids, mask, cfg, gate)
                    res[spec] = (timed(lambda: rollout(student, teacher, ids, mask, cfg, gate), args.repeats),
                                 float(out.from_teacher[out.response_mask].float().mean()), out.forwards["teacher"] / n)
                row = {"arch": arch, "vocab": vocab, "new_tokens": n, "target_share": share,
                       "teacher_share": round(res[True][1], 3), "teacher_forwards_per_token": round(res[True][2], 3),
                       "floor_s": round(t_floor, 3), "lockstep_s": round(res[False][0], 3),
                       "speculative_s": round(res[True][0], 3),
                       "speculative_over_floor": round(res[True][0] / t_floor, 2),
                       "lockstep_over_speculative": round(res[False][0] / res[True][0], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"summary": "rollout", "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": len(rows)}))


if __name__ == "__main__":
    main()
