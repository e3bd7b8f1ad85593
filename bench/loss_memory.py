"""Benchmark 4 of issue 5: peak memory of the loss, vocab 50257, 8 x 512 tokens.

Each variant runs in a fresh subprocess: one student forward + KD loss (forward KL against a
teacher) + backward, full logits vs ``train.loss_chunk``.  Memory is the process's peak RSS
(``ru_maxrss``) minus its RSS just before the step, compared with the size of one student
logits tensor (8 x 512 x 50257 float32 = 823 MB).  Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import resource, json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from switchkd.config import load_config
from switchkd.losses import chunked_loss_sum, shifted, token_loss
chunk, B, T, V = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def mk(layers, dim, seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=dim, n_layer=layers, n_head=2))
student, teacher = mk(2, 128, 1), mk(2, 128, 2).eval().requires_grad_(False)
method = load_config(None, ["method.name=kd", "teacher.name=x", "method.divergence=fkl"]).method
ids = torch.randint(0, V, (B, T)); mask = torch.ones_like(ids); labels = ids.clone(); labels[:, :64] = -100
batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
if chunk:
    loss = chunked_loss_sum(student, student.get_output_embeddings(), batch, teacher, None, method, V, chunk)
else:
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits
    s, y = shifted(student(input_ids=ids, attention_mask=mask).logits, labels, V)
    loss = token_loss(s, shifted(t, labels, V)[0], y, method).sum()
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_minus_before_MB": round((peak - before) / 2**20)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50257)
    args = p.parse_args()
    logits_mb = args.batch * args.tokens * args.vocab * 4 / 2**20
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, "-c", CHILD, str(chunk), str(args.batch), str(args.tokens), str(args.vocab)],
                             capture_output=True, text=True, check=True)
        mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_minus_before_MB"]
        print(json.dumps({"loss_chunk": chunk, "peak_MB": mb, "logits_tensor_MB": round(logits_mb),
                          "ratio_to_logits": round(mb / logits_mb, 2)}), flush=True)



if __name__ == "__main__":
    main()
