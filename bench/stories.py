"""The stories260K setting: a real pretrained tiny Llama teacher (llama2.c) and a student ~6.6x smaller.

Data: the teacher's own sampled stories from BOS, split into a prompt (the first
``prompt_tokens`` tokens) and the continuation (the reference).  Metrics per student:
the teacher's per-token NLL of the student's sampled continuations (quality as the teacher
judges it), the student's per-token NLL of held-out teacher continuations (coverage), and
ROUGE-L against the teacher's continuation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from switchkd.convert import convert_llama2c
from switchkd.data import encode_prompt, left_pad
from switchkd.evaluate import rouge_l
from switchkd.rollout import RolloutConfig, StudentWrites, TeacherWrites, rollout

SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_teacher(root: Path) -> Path:
    out = root / "stories260K-hf"
    if not (out / "config.json").is_file():
        d = SHARED / "models/stories260K"
        convert_llama2c(d / "stories260K.bin", d / "tok512.bin", out)
    return out


def make_student(teacher: Path, out: Path, seed: int = 0) -> Path:
    """A random Llama ~6.6x smaller than the teacher (39K vs 260K parameters), with the teacher's tokenizer."""
    if (out / "config.json").is_file():
        return out
    t = LlamaConfig.from_pretrained(teacher)
    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=32, intermediate_size=86, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=t.max_position_embeddings,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


@torch.no_grad()
def make_data(teacher_dir: Path, root: Path, n: Dict[str, int], prompt_tokens: int = 12, length: int = 96) -> Dict[str, Path]:
    """Sample stories from the teacher and write train/dev/test JSONL (MiniLLM format with ``prompt``)."""
    paths = {s: root / f"stories-{s}.jsonl" for s in n}
    if all(p.is_file() for p in paths.values()):
        return paths
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(1234)
    for split, count in n.items():
        rows = []
        while len(rows) < count:
            ids = torch.ones((64, 1), dtype=torch.long)
            out = rollout(None, model, ids, torch.ones_like(ids), RolloutConfig(
                max_new_tokens=length, do_sample=True, eos_token_id=2, pad_token_id=0, vocab_size=512), TeacherWrites())
            for seq, m in zip(out.sequences[:, 1:], out.response_mask):
                toks = seq[m].tolist()
                if toks and toks[-1] == 2:
                    toks = toks[:-1]
                if len(toks) <= prompt_tokens + 8:
                    continue
                prompt, cont = tok.decode(toks[:prompt_tokens]), tok.decode(toks[prompt_tokens:])
                rows.append({"instruction": prompt, "input": "", "prompt": prompt, "output": cont.strip()})
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows[:count]))
    return paths


@torch.no_grad()
def nll_metrics(student_dir: Path, teacher_dir: Path, test: Path, seed: int, new_tokens: int = 80) -> Dict[str, float]:
    """Teacher NLL of student samples, student NLL of teacher continuations, ROUGE-L (per token, nats)."""
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    ids, mask = left_pad(prompts, 0)
    torch.manual_seed(seed)
    out = rollout(student, None, ids, mask, RolloutConfig(max_new_tokens=new_tokens, do_sample=True,
                                                          eos_token_id=2, pad_token_id=0, vocab_size=512),
                  StudentWrites())
    P = ids.shape[1]
    full_mask = torch.cat([mask, out.response_mask.long()], 1)

    def nll(model, seq, m, resp):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, :-1, :512].float(), -1)
        tok_lp = logp.gather(-1, seq[:, 1:, None]).squeeze(-1)
        return float(-(tok_lp * resp[:, 1:]).sum() / resp[:, 1:].sum())

    resp = torch.cat([torch.zeros_like(mask), out.response_mask.long()], 1).float()
    teacher_nll = nll(teacher, out.sequences, full_mask, resp)
    # the student's NLL of held-out teacher continuations (with EOS where the story ended)
    conts = [tok(r["output"], add_special_tokens=False)["input_ids"] for r in rows]
    seqs = [p + c for p, c in zip(prompts, conts)]
    sids, smask = left_pad(seqs, 0)
    sresp = torch.zeros_like(smask, dtype=torch.float)
    for i, c in enumerate(conts):
        sresp[i, sids.shape[1] - len(c):] = 1
    student_nll = nll(student, sids, smask, sresp)
    texts = [tok.decode(out.sequences[i, P:][out.response_mask[i]], skip_special_tokens=True) for i in range(len(rows))]
    rouge = sum(rouge_l(t, [r["output"]]) for t, r in zip(texts, rows)) / len(rows)
    return {"teacher_nll_of_student_samples": teacher_nll, "student_nll_of_teacher_samples": student_nll,
            "rougeL_vs_teacher": rouge, "student_sample_ppl_by_teacher": math.exp(teacher_nll)}
