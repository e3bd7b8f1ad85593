"""Auxiliary loss terms: the LM loss on pre-training text (DistiLLM/MiniLLM's --lm-data-dir, --lm-coef) and
BiLD's instruction loss."""

from __future__ import annotations

import json

import pytest
import torch

from switchkd.config import ConfigError, load_config
from switchkd.data import collate, load_examples, tokenize
from switchkd.lmdata import LMStream, lm_loss, pack, read_texts
from switchkd.models import load_pair, tiny_tokenizer
from switchkd.train import step_gradients, train
from tests.test_train import cpu_accelerator

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))


def test_pack_and_stream(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "pt.txt").write_text(TEXT)
    docs = read_texts(str(tmp_path / "pt.txt"))
    assert len(docs) == 40 and docs[3].startswith("Document 3:")
    chunks = pack(docs, tok, 32)
    flat = [t for c in chunks for t in c]
    assert all(len(c) == 32 for c in chunks) and flat.count(tok.eos_token_id) >= 40 - 2  # joined with EOS
    a = LMStream(str(tmp_path / "pt.txt"), tok, 32, seed=3, rank=0, world=2)
    b = LMStream(str(tmp_path / "pt.txt"), tok, 32, seed=3, rank=1, world=2)
    assert not set(a.order) & set(b.order)  # processes read disjoint chunks
    first = a.next(4, torch.device("cpu"))
    assert first["input_ids"].shape == (4, 32) and torch.equal(first["labels"], first["input_ids"])
    state = a.state_dict()
    nxt = a.next(4, torch.device("cpu"))
    again = LMStream(str(tmp_path / "pt.txt"), tok, 32, seed=3, rank=0, world=2)
    again.load_state_dict(state)
    assert torch.equal(again.next(4, torch.device("cpu"))["input_ids"], nxt["input_ids"])  # resumes exactly


def test_bad_lm_data_is_one_line(tmp_path):
    (tmp_path / "pt.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"pt.jsonl: record 1 has no string field 'text'"):
        read_texts(str(tmp_path / "pt.jsonl"))
    with pytest.raises(ConfigError, match="no such file"):
        read_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match=r"method.lm_weight"):
        load_config(None, ["method.lm_weight=-1"])


def test_lm_term_gradients_equal_brute_force(tmp_path):
    """step_gradients with LM batches == autograd of sum(CE)/tokens + w * mean over micro-batches of
    the mean CE on the text batches."""
    (tmp_path / "pt.txt").write_text(TEXT)
    cfg = load_config(None, ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "method.lm_weight=0.7",
                             f"method.lm_data={tmp_path / 'pt.txt'}", "data.synthetic_size=8"])
    student, _, tok, vocab = load_pair(cfg.model, None)
    items, _ = tokenize(load_examples("synthetic", cfg.data, tok)[:4], tok, 128, 320)
    group = [collate(items[:2], tok.pad_token_id), collate(items[2:], tok.pad_token_id)]
    stream = LMStream(cfg.method.lm_data, tok, 48, seed=0)
    lm = [stream.next(3, torch.device("cpu")) for _ in group]
    stats = {}
    step_gradients(student, None, group, cfg, vocab, cpu_accelerator(), lm, stats)
    got = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    ce_sum, n = 0.0, 0
    for b in group:
        logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        target = b.labels[:, 1:]
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(logits[target != -100][:, :vocab], target[target != -100],
                                                           reduction="sum")
        n += int((target != -100).sum())
    pts = [lm_loss(student, x) for x in lm]
    (ce_sum / n + 0.7 * sum(pts) / len(pts)).backward()
    for k, p in student.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6)
    assert stats["lm_loss"] == pytest.approx(float(sum(p.detach() for p in pts) / len(pts)), rel=1e-5)


def test_training_logs_the_lm_loss(tmp_path):
    (tmp_path / "pt.txt").write_text(TEXT)
    cfg = load_config(None, ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=1,dim=32,heads=2",
                             "method.divergence=fkl", f"method.lm_data={tmp_path / 'pt.txt'}", "data.synthetic_size=16",
                             "data.max_length=64", "data.max_prompt_length=48", "train.max_steps=2", "train.batch_size=4",
                             "train.log_every=1", f"output.dir={tmp_path / 'run'}"])
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["lm_loss"] > 0 for r in recs) and len(recs) == 2


def test_bild_instruction_loss_equals_the_official_formula():
    """method.instruction_weight=1 with forward KL at T=1: gradients of the official BiLD trainer's
    ``instruction_loss + vanilla_kl_loss`` (transcribed from fpcsong/BiLD, float64) on one row."""
    cfg = load_config(None, ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:llama,layers=1,dim=32,heads=4",
                             "method.divergence=fkl", "method.instruction_weight=1.0", "data.synthetic_size=8"])
    student, teacher, tok, vocab = load_pair(cfg.model, cfg.teacher)
    items, _ = tokenize(load_examples("synthetic", cfg.data, tok)[:1], tok, 128, 320)
    b = collate(items, tok.pad_token_id)
    stats = {}
    step_gradients(student, teacher, [b], cfg, vocab, cpu_accelerator(), None, stats)
    got = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    student64, teacher64 = student.double(), teacher.double()
    logits_s = student64(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
    with torch.no_grad():
        logits_t = teacher64(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
    shift_labels = b.labels[..., 1:]
    ls, lt, am = logits_s[..., :-1, :], logits_t[..., :-1, :], b.attention_mask[..., :-1].double()

    def vanilla_kl(s, t):  # BiLD's vanilla_kl_loss at temperature 1
        return torch.nn.functional.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="none").sum(-1)

    inst_mask = (am * (shift_labels < 0).double()).view(-1)
    instruction = (vanilla_kl(ls, lt).view(-1) * inst_mask).sum() / inst_mask.sum()
    resp_mask = (shift_labels > -1).double().view(-1)
    (instruction + (vanilla_kl(ls, lt).view(-1) * resp_mask).sum() / resp_mask.sum()).backward()
    for k, p in student64.named_parameters():
        torch.testing.assert_close(got[k].double(), p.grad, rtol=1e-4, atol=1e-7)
    assert stats["instruction_loss"] == pytest.approx(float(instruction.detach()), rel=1e-4)
    with pytest.raises(ConfigError, match="instruction_weight.*priming"):
        load_config(None, ["teacher.name=tiny:gpt2", "method.divergence=fkl", "method.instruction_weight=1",
                           "method.priming=teacher"])
