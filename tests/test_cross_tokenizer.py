"""Distillation across vocabularies: the byte alignment and the ULD / GOLD losses against TRL's GOLD
trainer (``trl.experimental.gold.ULDLoss``, values and gradients), and training a byte-level teacher into a
GPT-2-BPE student end to end."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from switchkd.align import align, byte_ends, token_bytes
from switchkd.cross import CrossView, gold, merge, shared_vocabulary, uld

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Héllo wörld! 你好 — a test\n\nwith newlines 123.", "The answer is 42.", "a", "  spaced   out  ", "e\u0301"]


@pytest.fixture(scope="module")
def toks(shared):
    from transformers import AutoTokenizer

    from switchkd.models import tiny_tokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(shared / "data/gpt2_tokenizer"))
    gpt2.pad_token = gpt2.eos_token
    return gpt2, tiny_tokenizer()


def _trl():
    from trl.experimental.gold.gold_trainer import ULDLoss

    return ULDLoss


def test_token_bytes_spell_the_text(toks):
    for tok in toks:
        table = token_bytes(tok)
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert b"".join(table[i] for i in ids) == text.encode("utf-8"), (type(tok).__name__, text)
        assert table[tok.eos_token_id] == b""  # special tokens cover no text


def test_alignment_equals_trls_byte_walk(toks):
    gpt2, byt5 = toks
    rng = np.random.default_rng(0)
    cases = [(byte_ends(token_bytes(gpt2), gpt2(t, add_special_tokens=False)["input_ids"]),
              byte_ends(token_bytes(byt5), byt5(t, add_special_tokens=False)["input_ids"])) for t in TEXTS]
    for _ in range(200):  # random segmentations of one length, zero-width tokens (EOS) and unequal totals included
        total = int(rng.integers(1, 30))
        cut = lambda n=total: np.sort(np.r_[rng.choice(np.arange(0, n + 1), int(rng.integers(1, 12))), n])  # noqa: E731
        cases.append((cut(), cut() if rng.random() < 0.8 else cut()[:-1]))
    for s_ends, t_ends in cases:
        gs, gt, n = align(np.asarray(s_ends), np.asarray(t_ends))
        offsets = lambda e: [[0 if i == 0 else int(e[i - 1]), int(e[i])] for i in range(len(e))]  # noqa: E731
        want_s, want_t = _trl()._align_by_byte_offsets(offsets(s_ends), offsets(t_ends))
        got_s = [np.nonzero(gs == k)[0].tolist() for k in range(n)]
        got_t = [np.nonzero(gt == k)[0].tolist() for k in range(n)]
        assert (got_s, got_t) == (want_s, want_t), (s_ends, t_ends)


def _config(**kw):
    base = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False,
                uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("strategy", ["bayesian", "observed"])
def test_merge_equals_trl(strategy):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(9, 13, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    ids = torch.randint(0, 13, (9,), generator=g)
    groups = [[0], [1, 2, 3], [4], [5, 6], [7, 8]]
    group = torch.tensor([k for k, grp in enumerate(groups) for _ in grp])
    loss = _trl()(_config(uld_token_merge_strategy=strategy))
    want = loss._merge_probabilities_with_alignment_groups(probs, groups, ids.tolist())
    got = merge(probs, group, ids, len(groups), strategy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((got * w).sum(), probs)
    (gb,) = torch.autograd.grad((want * w).sum(), probs)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def _trl_sequence_loss(s_logits, t_logits, s_ids, t_ids, s_ends, t_ends, cfg, s_tok=None, t_tok=None):
    """TRL's ULDLoss on one sequence laid out as [one prompt token] + response (labels on the response)."""
    loss = _trl()(cfg, student_tokenizer=s_tok, teacher_tokenizer=t_tok)

    def layout(logits, ids, ends):
        n = len(ids)
        full_ids = torch.tensor([[0] + list(ids)])
        labels = full_ids.clone()
        labels[0, 0] = -100
        offs = torch.tensor([[[0, 0]] + [[0 if i == 0 else int(ends[i - 1]), int(ends[i])] for i in range(n)]])
        return logits[None], labels, full_ids, offs  # logits [1, n + 1, V]: position k predicts token k + 1

    sl, s_lab, s_full, s_off = layout(s_logits, s_ids, s_ends)
    tl, t_lab, t_full, t_off = layout(t_logits, t_ids, t_ends)
    return loss(sl, tl, s_lab, t_lab, s_full, t_full, s_off, t_off)


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_losses_equal_trls_uld_and_hybrid(toks, kind):
    """One response tokenized by GPT-2's BPE (student) and byte-level (teacher): our merge + loss, averaged
    over groups as TRL averages a sequence, equals TRL's ULDLoss (value and student gradient <= 1e-5)."""
    gpt2, byt5 = toks
    text = TEXTS[0]
    s_ids, t_ids = gpt2(text, add_special_tokens=False)["input_ids"], byt5(text, add_special_tokens=False)["input_ids"]
    s_ends, t_ends = byte_ends(token_bytes(gpt2), s_ids), byte_ends(token_bytes(byt5), t_ids)
    g = torch.Generator().manual_seed(3)
    vs, vt = len(gpt2), len(byt5)
    s_logits = (torch.randn(len(s_ids) + 1, vs, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t_logits = torch.randn(len(t_ids) + 1, vt, generator=g, dtype=torch.float64) * 2
    cfg = _config(uld_use_hybrid_loss=kind == "gold")
    want = _trl_sequence_loss(s_logits, t_logits, s_ids, t_ids, s_ends, t_ends, cfg, gpt2, byt5)

    gs, gt, n = align(s_ends, t_ends)
    gs, gt = torch.from_numpy(gs), torch.from_numpy(gt)
    s_m = merge(torch.softmax(s_logits[:-1], -1), gs, torch.tensor(s_ids), n)
    t_m = merge(torch.softmax(t_logits[:-1], -1), gt, torch.tensor(t_ids), n)
    if kind == "uld":
        got = uld(s_m, t_m).mean()
    else:
        s_matched, t_matched = shared_vocabulary(gpt2, byt5)
        assert len(t_matched) > 50  # the printable ASCII characters are tokens of both
        got = gold(s_m, t_m, student_matched=s_matched, teacher_matched=t_matched, beta=0.5).mean()
    torch.testing.assert_close(got, want.squeeze().to(got.dtype), rtol=1e-5, atol=1e-7)
    (ga,) = torch.autograd.grad(got, s_logits)
    (gb,) = torch.autograd.grad(want.squeeze(), s_logits)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_cross_view_rebuilds_the_teachers_tokens_and_spreads_group_losses(toks):
    from switchkd.batch import Batch

    gpt2, byt5 = toks
    view = CrossView(gpt2, byt5, "gold")
    prompts_s = [gpt2("Q: hi\nA:")["input_ids"], gpt2("Say:")["input_ids"]]
    prompts_t = [byt5("Q: hi\nA:", add_special_tokens=False)["input_ids"], byt5("Say:", add_special_tokens=False)["input_ids"]]
    responses = [gpt2(" Héllo there", add_special_tokens=False)["input_ids"] + [gpt2.eos_token_id],
                 gpt2(" 你好", add_special_tokens=False)["input_ids"]]
    b = view.apply(Batch.build(prompts_s, responses, gpt2.pad_token_id, [0, 1], prompts_t))
    t_rows = [row[row != -100].tolist() for row in b.teacher_labels]
    assert byt5.decode(t_rows[0], skip_special_tokens=True) == " Héllo there" and t_rows[0][-1] == byt5.eos_token_id
    assert byt5.decode(t_rows[1]) == " 你好"
    ns = int((b.labels[:, 1:] != -100).sum())
    nt = int((b.teacher_labels[:, 1:] != -100).sum())
    assert b.alignment.student.shape == (ns,) and b.alignment.teacher.shape == (nt,)
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(ns, len(gpt2), generator=g, requires_grad=True)
    target = view.targets(torch.randn(nt, len(byt5), generator=g), b)
    y = b.labels[:, 1:][b.labels[:, 1:] != -100]
    per_token = view.token_loss(s_logits, target, y)
    assert per_token.shape == (ns,) and (per_token >= 0).all()
    # the sum over tokens is the sum over paired groups of the group loss
    s_m = merge(torch.softmax(s_logits, -1), b.alignment.student, y, b.alignment.n)
    keep = b.alignment.paired
    want = gold(s_m[keep], target.probs[keep], student_matched=view.s_matched, teacher_matched=view.t_matched).sum()
    torch.testing.assert_close(per_token.sum(), want)


TEACHER = "tiny:gpt2,layers=2,dim=32,heads=2,seed=1"  # byte-level (ByT5) vocabulary


@pytest.fixture(scope="module")
def bpe_student(shared, tmp_path_factory):
    """A tiny GPT-2 with GPT-2's BPE tokenizer (the real vocabulary), saved as a model directory."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("bpe")
    tok = AutoTokenizer.from_pretrained(str(shared / "data/gpt2_tokenizer"))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.slow  # end-to-end training runs with a 50K-vocabulary student
@pytest.mark.parametrize("preset,extra", [("sft", []), ("kd", []), ("kd", ["method.cross_tokenizer=uld"]), ("seqkd", []),
                                          ("gkd", ["method.mixture.student_ratio=1.0"]),
                                          ("distillm", ["method.distillm.init_student_prob=1.0"]),
                                          ("switch", ["method.switch.tau0=0.5"]),
                                          ("skd", ["method.skd.teacher_temperature=1", "method.skd.teacher_top_p=1",
                                                   "method.skd.skip_first_token=false"]), ("minillm", [])])
def test_a_byte_level_teacher_trains_a_bpe_student(bpe_student, preset, extra, tmp_path):
    from switchkd.config import load_config
    from switchkd.train import train

    cfg = load_config(ROOT / f"configs/tiny/{preset}.yaml", [
        f"model.name={bpe_student}", f"teacher.name={TEACHER}", "data.synthetic_size=24", "train.max_steps=2",
        "train.batch_size=4", "train.log_every=1", "eval.limit=2", "method.max_new_tokens=12",
        "method.distillm.dev_limit=4", "eval.max_new_tokens=4", f"output.dir={tmp_path}", *extra])
    final = train(cfg)
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (final / "model.safetensors").is_file() and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] > 0


@pytest.mark.slow
def test_mismatched_vocabularies_are_refused_in_one_line(bpe_student, capsys, tmp_path):
    from switchkd.cli import main

    for extra, fragment in ((["method.cross_tokenizer=off"], "method.cross_tokenizer=off"),
                            (["method.instruction_weight=0.5"], "method.instruction_weight"),
                            (["train.loss_chunk=8"], "train.loss_chunk")):
        rc = main(["train", str(ROOT / "configs/tiny/kd.yaml"), f"model.name={bpe_student}", f"teacher.name={TEACHER}",
                   "data.synthetic_size=16", f"output.dir={tmp_path / 'o'}", *extra])
        err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("switchkd: error:") and fragment in err[0], err
        assert "teacher's tokenizer" in err[0] and "student's" in err[0]
        assert not (tmp_path / "o").exists()


def test_teacher_rows_are_cut_at_its_positions_and_the_rest_is_left_out(toks):
    from switchkd.batch import Batch

    gpt2, byt5 = toks
    view = CrossView(gpt2, byt5, "uld")
    view.max_length = 12
    prompt_t = byt5("Q:", add_special_tokens=False)["input_ids"]
    response = gpt2(" a long answer that the teacher cannot read whole", add_special_tokens=False)["input_ids"]
    b = view.apply(Batch.build([gpt2("Q:")["input_ids"]], [response], gpt2.pad_token_id, [0], [prompt_t]))
    assert b.teacher_input_ids.shape[1] <= 12
    a = b.alignment
    trailing = int(a.student.max())
    assert not bool(a.paired[trailing]) and bool(a.paired[:trailing].all())  # only the cut remainder is left out
    g = torch.Generator().manual_seed(0)
    ns, nt = a.student.numel(), a.teacher.numel()
    y = b.labels[:, 1:][b.labels[:, 1:] != -100]
    loss = view.token_loss(torch.randn(ns, len(gpt2), generator=g), view.targets(torch.randn(nt, len(byt5),
                                                                                              generator=g), b), y)
    assert (loss[a.student == trailing] == 0).all() and (loss[a.student < trailing] > 0).all()


def test_token_bytes_of_a_sentencepiece_vocabulary(shared, tmp_path):
    """A Llama SentencePiece-style tokenizer (stories260K's, converted): '▁' pieces and byte-fallback pieces
    spell the text, and its prefix space is discounted when it is aligned with GPT-2's BPE."""
    from transformers import AutoTokenizer

    from switchkd.cli import main

    d = shared / "models/stories260K"
    assert main(["convert", "llama2c", str(d / "stories260K.bin"), str(d / "tok512.bin"), str(tmp_path / "m")]) == 0
    sp = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    table = token_bytes(sp)
    for text in ("Once upon a time, there was a little girl.", "Héllo 你好\nnew line"):
        ids = sp(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(table[i] for i in ids)
        assert spelled.lstrip(b" ") == text.encode("utf-8"), (spelled, text)  # (SentencePiece adds a leading space)
    from switchkd.align import batch_alignment

    gpt2 = AutoTokenizer.from_pretrained(str(shared / "data/gpt2_tokenizer"))
    text = "Once upon a time, there was a little girl."
    s_ids, t_ids = gpt2(text, add_special_tokens=False)["input_ids"], sp(text, add_special_tokens=False)["input_ids"]
    a = batch_alignment([s_ids], [t_ids], token_bytes(gpt2), table)
    assert bool(a.paired.all()) and a.n >= text.count(" ")  # the prefix space discounted: every word boundary shared


@pytest.mark.slow
def test_calibrate_across_vocabularies(bpe_student, capsys):
    """``switchkd calibrate`` decodes as the run does across vocabularies and finds a tau0 for the target."""
    from switchkd.cli import main

    rc = main(["calibrate", str(ROOT / "configs/tiny/switch.yaml"), f"model.name={bpe_student}",
               f"teacher.name={TEACHER}", "data.synthetic_size=16", "method.max_new_tokens=10", "--target", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0 and "method.switch.tau0=" in out
    share = float(out.split("measured teacher share ")[1].split(",")[0])
    assert 0.2 <= share <= 0.8
