"""SWITCH and SKD across vocabularies (:mod:`switchkd.interleave`): spans re-tokenized exactly, and the rule
checked by recomputation -- every step's gate recomputed in float64 from full forwards of both models on the
text written so far, the writer and its (greedy) token checked against it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_spec import spec

from switchkd.batch import left_pad
from switchkd.interleave import Vocab, cross_switch

ROOT = Path(__file__).resolve().parents[1]
SPANS = ["Hello", " world", "abc", " x", "\n\n", "  two spaces", "é", "你好", "😀 ok", "a,b.c"]


@pytest.fixture(scope="module")
def pair(shared):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from switchkd.models import tiny_tokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(shared / "data/gpt2_tokenizer"))
    gpt2.pad_token = gpt2.eos_token
    byt5 = tiny_tokenizer()
    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2), n_positions=256, n_embd=32, n_layer=1, n_head=2)).eval()
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(byt5), n_positions=256, n_embd=32, n_layer=2, n_head=2)).eval()
    return gpt2, byt5, student, teacher


def test_spans_are_spelled_exactly(pair, shared, tmp_path):
    from transformers import AutoTokenizer

    from switchkd.cli import main

    gpt2, byt5, _, _ = pair
    d = shared / "models/stories260K"
    assert main(["convert", "llama2c", str(d / "stories260K.bin"), str(d / "tok512.bin"), str(tmp_path / "m")]) == 0
    sp = AutoTokenizer.from_pretrained(str(tmp_path / "m"))  # SentencePiece: adds a prefix space to a text alone
    for tok in (gpt2, byt5, sp):
        v = Vocab(tok)
        for span in SPANS:
            data = span.encode("utf-8")
            assert v.spell(v.encode(data)) == data, (type(tok).__name__, span)
        assert v.spell(v.encode(b"\xa0\xff")) == b"\xa0\xff"  # bytes that are no UTF-8: one token per byte
    v = Vocab(gpt2)
    assert v.encode(b" world") == gpt2(" world", add_special_tokens=False)["input_ids"]  # the tokenizer's own spelling
    assert len(Vocab(sp).encode(b"once")) == 2  # "on" "ce": the SentencePiece prefix space dropped, not byte by byte


def _gate64(kind, q_logits, p_logits, s_onehot, t_onehot):
    """The cross gate in float64 by another route: numpy sorting, and next-byte distributions as products with
    one-hot [V, 257] first-byte matrices built from the byte tables."""
    q, p = (torch.softmax(x.double(), -1).numpy() for x in (q_logits, p_logits))
    if kind == "sorted":
        qs, ps = -np.sort(-q), -np.sort(-p)
        n = max(len(qs), len(ps))
        return 0.5 * float(np.abs(np.pad(qs, (0, n - len(qs))) - np.pad(ps, (0, n - len(ps)))).sum())
    if kind == "shared":  # restricted to the tokens spelled the same in both vocabularies, renormalised
        qb, pb = q[s_onehot], p[t_onehot]
        qb, pb = qb / qb.sum(), pb / pb.sum()
    else:
        qb, pb = q @ s_onehot, p @ t_onehot
    m = (qb + pb) / 2
    kl = lambda a: float(sum(x * math.log(x / y) for x, y in zip(a, m) if x > 0))  # noqa: E731
    return 0.5 * kl(qb) + 0.5 * kl(pb)


def _onehot(table):
    out = np.zeros((len(table), 257))
    out[np.arange(len(table)), [b[0] if b else 256 for b in table]] = 1.0
    return out


def _all_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kind,gate,tau0,decay", [("shared", "jsd", 0.0036, 0.0), ("byte", "jsd", 0.53, 0.005),
                                                  ("sorted", "jsd", 0.98965, 0.0),
                                                  ("byte", "rank", 20.5, 0.0)])
def test_the_rule_recomputed(pair, kind, gate, tau0, decay):
    """(Random models: their gates are flat, so the thresholds sit inside the measured range.)"""
    gpt2, byt5, student, teacher = pair
    s, t = Vocab(gpt2), Vocab(byt5)
    prompts = ["Question: what is 2+2?\nAnswer:", "Hi", "Tell me a story about a cat."]
    s_rows = [gpt2(p)["input_ids"] for p in prompts]
    t_rows = [byt5(p, add_special_tokens=False)["input_ids"] for p in prompts]
    s_ids, s_mask = left_pad(s_rows, gpt2.pad_token_id)
    t_ids, t_mask = left_pad(t_rows, byt5.pad_token_id)
    cfg = spec(source="switch", max_new_tokens=14, do_sample=False, tau0=tau0, decay=decay, gate=gate,
                        schedule="exp" if decay else "const")
    out = cross_switch(student, teacher, s_ids, s_mask, t_ids, t_mask, *cfg, s, t, kind=kind)
    resp = out.responses(s_ids.shape[1])
    writers = []
    if kind == "shared":
        pairs = [(i, byt5.get_vocab()[w]) for w, i in gpt2.get_vocab().items() if w in byt5.get_vocab()]
        onehots = (np.array([i for i, _ in pairs]), np.array([j for _, j in pairs]))
    else:
        onehots = (_onehot(s.table), _onehot(t.table))
    for i in range(len(prompts)):
        t_tokens, steps = out.trace[i]
        sp = tp = 0
        forced = False
        s_all, t_all = _all_logits(student, s_rows[i] + resp[i]), _all_logits(teacher, t_rows[i] + t_tokens)
        for n_s, n_t, d, writer in steps:  # (causal models: the logits after a prefix are those of the full forward)
            q, p = s_all[len(s_rows[i]) + sp - 1], t_all[len(t_rows[i]) + tp - 1]
            if gate == "rank":
                first = t.encode(s.table[int(q.argmax())])[0]
                want = float((p > p[first]).sum())
                assert d == want and (writer == "teacher") == (d > tau0 or forced)
            else:
                want = _gate64(kind, q, p, *onehots)
                assert abs(d - want) < 1e-4, (d, want)
                tau = tau0 * math.exp(-decay * sp)
                assert forced or (writer == "teacher") == (d > tau), (d, tau, writer)
            if writer == "student" and n_s:
                assert resp[i][sp] == int(q.argmax())
            if writer == "teacher" and n_t:
                assert t_tokens[tp] == int(p.argmax())
            assert out.from_teacher[i, sp:sp + n_s].tolist() == [writer == "teacher"] * n_s
            forced = (writer == "student" and n_s and not n_t) or (writer == "teacher" and n_t and not n_s)
            sp, tp = sp + n_s, tp + n_t
            writers.append(writer)
        assert sp == len(resp[i]) and tp == len(t_tokens)
        a, b = s.spell(resp[i]), t.spell(t_tokens)  # the same text (one side may end a span or a character early)
        assert (a.startswith(b) or b.startswith(a)) and abs(len(a) - len(b)) <= 16
    assert {"student", "teacher"} <= set(writers)  # both wrote: the rule was exercised both ways


def test_no_row_passes_the_teachers_positions(pair):
    gpt2, byt5, student, teacher = pair
    s, t = Vocab(gpt2), Vocab(byt5)
    s_ids, s_mask = left_pad([gpt2("Hi there")["input_ids"]], gpt2.pad_token_id)
    t_ids, t_mask = left_pad([byt5("Hi there", add_special_tokens=False)["input_ids"]], byt5.pad_token_id)
    cfg = spec(source="switch", max_new_tokens=40, do_sample=True, tau0=0.0, seed=3)
    out = cross_switch(student, teacher, s_ids, s_mask, t_ids, t_mask, *cfg, s, t, t_max_len=t_ids.shape[1] + 5)
    assert len(out.trace[0][0]) < 5 and out.from_teacher[out.response_mask].all()


def test_minillm_rewards_over_aligned_spans_sum_to_the_sequence_log_ratio(pair):
    """MiniLLM across vocabularies: with gamma 1, no length normalisation and no whitening, a row's first advantage
    is the sum of its span rewards = log p_teacher(response) - log q_student(response), each side in its own tokens
    (recomputed here by one unpadded forward per row and model)."""
    from switchkd.config import load_config
    from switchkd.cross import CrossView
    from switchkd.data import collate, load_examples, tokenize
    from switchkd.methods.base import Run
    from switchkd.methods.minillm import MinillmSource

    gpt2, byt5, student, teacher = pair
    cfg = load_config(ROOT / "configs/tiny/minillm.yaml", [
        "data.synthetic_size=8", "method.max_new_tokens=10", "method.minillm.gamma=1.0",
        "method.minillm.length_norm=none", "method.minillm.whiten=false", "method.minillm.reward_scale=1.0",
        "method.minillm.reward_clip=1e9", "method.minillm.teacher_mix=0.5"])
    view = CrossView(gpt2, byt5)
    items, _ = tokenize(load_examples(cfg.data.train, cfg.data, gpt2, 3), gpt2, 64, 128, "none", byt5)
    src = MinillmSource(cfg, student, teacher, gpt2, len(gpt2), run=Run(cross=view))
    new = src(collate(items, gpt2.pad_token_id), 0)
    assert bool(new.alignment.paired.all())
    n = (new.labels[:, 1:] != -100).sum(1).tolist()
    starts = [sum(n[:i]) for i in range(len(n))]
    def seq_lp(model, ids, mask, labels, i):
        ids, lab = ids[i][mask[i].bool()], labels[i][mask[i].bool()]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        y = lab[1:]
        return float(lp[y != -100].gather(-1, y[y != -100][:, None]).sum())

    for i in range(len(n)):
        want = seq_lp(teacher, new.teacher_input_ids, new.teacher_attention_mask, new.teacher_labels, i) - seq_lp(
            student, new.input_ids, new.attention_mask, new.labels, i)
        assert abs(float(new.policy.advantage[starts[i]]) - want) < 1e-3 * max(1.0, abs(want)), (i, want)
    w = new.policy.weight
    assert bool(((w > 0) & (w <= 1 / 0.5 + 1e-5)).all())  # q / (a p + (1 - a) q) <= 1 / (1 - a)
