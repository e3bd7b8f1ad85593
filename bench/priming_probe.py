"""Does a tiny teacher learn to read a ground-truth priming prefix?  (the priming benchmark's precondition)

A plain PyTorch loop trains ``SPEC`` on the arithmetic suite, ``--gt-share`` of the prompts (half) behind the built-in
``ground_truth`` prefix, a tenth behind ``teacher``, the rest unprimed, and prints every 50 steps the dev
loss per response byte without priming and with ground-truth priming.  A teacher that reads the
reference it is shown has a primed loss near 0 while the unprimed loss stays above it.

    python bench/priming_probe.py [SPEC] [STEPS] [BATCH] [LR]
    python bench/priming_probe.py tiny:llama,layers=4,dim=128,heads=4,seed=1 1200 16 2e-3
    python bench/priming_probe.py demo 400 32 2e-3 --max-value 99   # the shipped demo teacher, harder suite
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM  # noqa: E402

from switchkd import demo  # noqa: E402
from switchkd.arith import MAX_VALUE, make_split  # noqa: E402
from switchkd.data import right_pad  # noqa: E402
from switchkd.models import build_tiny, tiny_tokenizer  # noqa: E402
from switchkd.priming import teacher_prompt  # noqa: E402


def batch(tok, examples: list, primings: list) -> tuple:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (labels on the response)."""
    prompts = [tok(teacher_prompt(s, e.prompt, e.references[0]), add_special_tokens=False).input_ids
               for e, s in zip(examples, primings)]
    responses = [tok(e.references[0], add_special_tokens=False).input_ids + [tok.eos_token_id] for e in examples]
    return right_pad(prompts, responses, tok.pad_token_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default="tiny:llama,layers=4,dim=128,heads=4,seed=1")
    p.add_argument("steps", nargs="?", type=int, default=1200)
    p.add_argument("batch", nargs="?", type=int, default=16)
    p.add_argument("lr", nargs="?", type=float, default=2e-3)
    p.add_argument("--max-value", type=int, default=MAX_VALUE, help="the suite's largest value")
    p.add_argument("--gt-share", type=float, default=0.5, help="training prompts behind the ground-truth prefix")
    a = p.parse_args()
    spec, steps, bs, lr = a.spec, a.steps, a.batch, a.lr
    tok, r = tiny_tokenizer(), random.Random(0)
    model = (AutoModelForCausalLM.from_pretrained(demo.shipped_teacher()) if spec == "demo"
             else build_tiny(spec, tok))
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    train, dev = make_split("train", 3000, max_value=a.max_value), make_split("dev", 64, max_value=a.max_value)

    def dev_loss(priming: str) -> float:
        model.eval()
        with torch.no_grad():
            ids, mask, labels = batch(tok, dev, [priming] * len(dev))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        model.train()
        return loss

    t0 = time.time()
    for step in range(1, steps + 1):
        examples, primings = [], []
        for _ in range(bs):
            examples.append(r.choice(train))
            u = r.random()
            primings.append("ground_truth" if u < a.gt_share else "teacher" if u < a.gt_share + 0.1 else "none")
        ids, mask, labels = batch(tok, examples, primings)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(), warm.step()
        if step % 50 == 0:
            print(f"step {step} ({time.time() - t0:.0f} s): dev loss unprimed {dev_loss('none'):.3f}, "
                  f"ground-truth-primed {dev_loss('ground_truth'):.3f}", flush=True)


if __name__ == "__main__":
    main()
