"""Sequence sources and presets of issue 3: every preset trains, GKD(lambda=0) == KD, priming alignment,
rollout teacher logits as loss targets, SeqKD generation, DistiLLM's adaptive schedule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from learning import assert_learns
from safetensors.torch import load_file

from switchkd.config import load_config
from switchkd.data import collate, load_examples, tokenize
from switchkd.losses import shifted, teacher_targets
from switchkd.methods import make_source
from switchkd.methods.base import Run
from switchkd.methods.distillm import DistillmSource
from switchkd.models import load_pair
from switchkd.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=3", "train.batch_size=4", "data.synthetic_size=24", "eval.limit=3", "eval.max_new_tokens=6",
        "method.max_new_tokens=12", "train.eval_every=2", "method.distillm.dev_limit=8"]


@pytest.mark.parametrize("preset", ["seqkd", "imitkd", "imitkd_argmax", "student_fkl", "gkd", "distillm", "switch"])
def test_tiny_presets_train(preset, tmp_path):
    cfg = load_config(ROOT / f"configs/tiny/{preset}.yaml", FAST + [f"output.dir={tmp_path}"])
    final = assert_learns(cfg)  # the dev objective falls
    assert (final / "model.safetensors").is_file()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs) and "dev_loss" in recs[-1]
    if preset == "switch":
        assert 0.0 <= recs[-1]["switch/teacher_frac"] <= 1.0
        assert any(k.startswith("switch/teacher_frac@0-7") for k in recs[-1])
        assert any(k.startswith("switch/gate@") for k in recs[-1])


def test_every_issue3_preset_exists():
    for scale in ("tiny", "gpt2-xl_to_gpt2"):
        for m in ("seqkd", "imitkd", "gkd", "distillm", "switch"):
            cfg = load_config(ROOT / f"configs/{scale}/{m}.yaml")
            assert cfg.method.name == m


def test_gkd_with_lambda_zero_equals_word_level_kd(tmp_path):
    base = ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=2,dim=32,heads=2,seed=5",
            "method.divergence=jsd", "method.params.beta=0.3", "data.dev=null", "train.max_steps=3",
            "train.batch_size=4", "data.synthetic_size=24", "data.max_prompt_length=128", "data.max_length=320"]
    gkd = train(load_config(None, base + ["method.name=gkd", "method.source=mixture", "method.mixture.student_ratio=0.0",
                                          f"output.dir={tmp_path / 'g'}"]))
    kd = train(load_config(None, base + ["method.name=kd", "method.source=dataset", f"output.dir={tmp_path / 'k'}"]))
    a, b = load_file(gkd / "model.safetensors"), load_file(kd / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k])


def _setup(extra=()):
    cfg = load_config(None, ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:llama,layers=2,dim=32,heads=4",
                             "method.name=kd", "method.divergence=fkl", "data.synthetic_size=8", "data.max_prompt_length=400", "data.max_length=600",
                             *extra])
    student, teacher, tok, vocab = load_pair(cfg.model, cfg.teacher)
    examples = load_examples("synthetic", cfg.data, tok)
    return cfg, student, teacher, tok, vocab, examples


def test_priming_aligns_teacher_positions_with_student_responses():
    cfg, student, teacher, tok, vocab, examples = _setup(["method.priming=ground_truth"])
    items, _ = tokenize(examples[:4], tok, 400, 600, "ground_truth")
    batch = collate(items, tok.pad_token_id)
    got = teacher_targets(teacher, batch, vocab)  # [N, V]
    # brute force: run the teacher on each primed sequence alone, read logits before each response token
    rows = []
    for x in items:
        assert x.teacher_prompt[-len(x.prompt):] == x.prompt and len(x.teacher_prompt) > len(x.prompt)
        seq = torch.tensor([x.teacher_prompt + x.response])
        logits = teacher(input_ids=seq).logits[0, :, :vocab]
        start = len(x.teacher_prompt)
        rows += [logits[start + j - 1] for j in range(len(x.response))]
    want = torch.stack(rows)
    assert got.shape == want.shape == (sum(len(x.response) for x in items), vocab)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the student reads exactly as many positions, in the same order (its targets are the same tokens)
    s_logits, s_target = shifted(student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                 batch.labels, vocab)
    assert s_target.tolist() == [t for x in items for t in x.response]
    assert s_logits.shape[0] == got.shape[0]


def test_priming_text_reaches_only_the_teacher():
    _, _, _, tok, _, examples = _setup()
    items, _ = tokenize(examples[:2], tok, 400, 600, "confidence")
    assert "Double-check" in tok.decode(items[0].teacher_prompt) and "Double-check" not in tok.decode(items[0].prompt)
    custom, _ = tokenize(examples[:1], tok, 400, 600, "Reference: {reference}\n")
    assert tok.decode(custom[0].teacher_prompt).startswith("Reference: " + examples[0].references[0])


def test_switch_rollout_logits_equal_a_teacher_forward():
    """The loss targets kept from a SWITCH rollout equal a second teacher forward over the sequences."""
    cfg, student, teacher, tok, vocab, examples = _setup(["method.source=switch", "method.switch.tau0=0.01",
                                                          "method.max_new_tokens=16", "method.priming=teacher"])
    items, _ = tokenize(examples[:4], tok, 400, 600, "teacher")
    source = make_source(cfg, student, teacher, tok, vocab)
    batch = source(collate(items, tok.pad_token_id), step=0)
    kept, batch.teacher_selected = batch.teacher_selected, None
    recomputed = teacher_targets(teacher, batch, vocab)
    torch.testing.assert_close(kept, recomputed, rtol=1e-4, atol=1e-4)
    assert source.stats()["switch/teacher_frac"] > 0


def test_seqkd_source_generates_once_and_matches_generate_command(tmp_path):
    cfg, student, teacher, tok, vocab, examples = _setup(["method.name=seqkd", "method.source=teacher",
                                                          "method.kd_ratio=0", "method.decoding.do_sample=false",
                                                          "method.max_new_tokens=10"])
    items, _ = tokenize(examples[:4], tok, 400, 600)
    source = make_source(cfg, student, teacher, tok, vocab)
    first = source(collate(items, tok.pad_token_id), 0)
    assert len(source.cache) == 4
    second = source(collate(items, tok.pad_token_id), 1)
    assert torch.equal(first.input_ids, second.input_ids)
    # the offline path: switchkd generate writes the same greedy teacher responses
    from switchkd.cli import main

    tiny_teacher_dir = tmp_path / "t"
    teacher.save_pretrained(tiny_teacher_dir)
    tok.save_pretrained(tiny_teacher_dir)
    out = tmp_path / "gen.jsonl"
    rc = main(["generate", str(ROOT / "configs/tiny/seqkd.yaml"), f"teacher.name={tiny_teacher_dir}",
               "data.synthetic_size=8", "data.limit=4", "method.max_new_tokens=10", "data.max_prompt_length=400",
               "data.max_length=600", "--output", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [e.prompt for e in examples[:4]]
    for row, x in zip(rows, items):
        assert row["output"] == tok.decode(source.cache[x.index], skip_special_tokens=True).strip()


def _official_choice(p, u, global_step, total_iters, buffer_len, capacity, schedule="decreasing", ratio=0.5):
    """DistiLLM's official finetune.py, transcribed: which data an iteration trains on."""
    samp = {"constant": p * ratio, "increasing": p * global_step / total_iters}.get(
        schedule, p * (1 - global_step / total_iters))
    if u < samp or (u < p and buffer_len < capacity):
        return "fresh"
    if u < p:
        return "replay"
    return "dataset"


def test_distillm_schedule_follows_the_official_rules():
    cfg, student, teacher, tok, vocab, examples = _setup(["method.name=distillm", "method.source=distillm", "data.dev=synthetic:dev",
                                                          "method.divergence=srkl", "method.max_new_tokens=8",
                                                          "method.distillm.replay_size=8"])
    src = DistillmSource(cfg, student, teacher, tok, vocab)
    assert (src.p, cfg.method.distillm.loss_eps, cfg.method.distillm.max_student_prob) == (0.0, 0.1, 1.0)  # official defaults
    # p: the first evaluation (before training) is the reference; p rises only >= loss_eps above it
    noisy_fall = [3.0, 2.98, 3.01, 2.95, 2.97, 2.90, 2.92, 2.85]
    for loss in noisy_fall:
        src.on_validation(loss)
    assert src.p == 0.0 and src.reference == 3.0  # ours raised p to 0.4 on such noise before
    src.on_validation(3.09)
    assert src.p == 0.0
    src.on_validation(3.1)  # >= 3.0 + 0.1: p rises, the reference resets
    assert src.p == pytest.approx(0.1) and src.reference == 3.1
    src.on_validation(3.15)
    assert src.p == pytest.approx(0.1)
    for k in range(20):
        src.on_validation(10.0 + k)
    assert src.p == pytest.approx(1.0)  # capped at 1.0
    # decisions: the same draws give the official choice at every step, buffer filling included
    rng = random.Random(0)
    for p in (0.3, 0.7, 1.0):
        src.p, buffer_len = p, 0
        for step in range(40):
            u = rng.random()
            want = _official_choice(p, u, step + 1, 40, buffer_len, 8)
            src.run = Run(total_steps=40)
            src.buffer.clear()
            src.buffer.extend([None] * buffer_len)
            assert src.decide(u, step) == want
            buffer_len = min(8, buffer_len + 4 * (want == "fresh"))
    src.buffer.clear()
    assert src.decide(0.5, 0) == "fresh" and src.decide(0.99, 0) == "fresh"  # p = 1: always student data
    src.p = 0.5
    assert src.decide(0.7, 0) == "dataset" and src.decide(0.45, 0) == "fresh"  # buffer not full: fresh, not replay
    src.p = 1.0
    src.buffer.extend([None] * 8)
    src.run = Run(total_steps=10)
    assert src.decide(0.05, 9) == "replay"  # the fresh share has decreased to 0 at the last step
    # end to end: a fresh batch fills the buffer; a replay batch is drawn from it; the state round-trips
    items, _ = tokenize(examples[:4], tok, 400, 600)
    src.buffer.clear()
    src.p, src.rng = 1.0, random.Random(1)
    fresh = src(collate(items, tok.pad_token_id), 0)
    assert len(src.buffer) == 4 and src.counts["fresh"] == 1
    src.buffer.extend(list(src.buffer))  # full (8): now replay happens for u >= fresh threshold
    replay = None
    for step in range(9, 10):
        replay = src(collate(items, tok.pad_token_id), step)
    assert src.counts["replay"] == 1
    rows = lambda b: {tuple(r[r != -100].tolist()) for r in b.labels}  # noqa: E731
    assert rows(replay) <= rows(fresh)  # replayed responses are the stored fresh ones
    again = DistillmSource(cfg, student, teacher, tok, vocab)
    again.load_state_dict(src.state_dict())
    assert again.p == 1.0 and len(again.buffer) == 8 and again.reference == src.reference


def test_distillm_without_dev_data_is_an_error():
    from switchkd.config import ConfigError

    with pytest.raises(ConfigError, match="needs data.dev"):
        load_config(ROOT / "configs/tiny/distillm.yaml", ["data.dev=null"])


def test_imitkd_anneals_from_dataset_to_student_greedy():
    from engine_spec import spec

    from switchkd.methods.imitkd import ImitkdSource
    from switchkd.rollout import rollout

    cfg, student, teacher, tok, vocab, examples = _setup(["method.name=imitkd", "method.source=imitkd",
                                                          "method.divergence=fkl", "method.max_new_tokens=8",
                                                          "method.imitkd.schedule=linear"])
    src = ImitkdSource(cfg, student, teacher, tok, vocab)
    src.run = Run(total_steps=11)
    assert [src.beta(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    items, _ = tokenize(examples[:8], tok, 400, 600)
    batch = collate(items, tok.pad_token_id)
    assert src(batch, 0) is batch  # beta 1: the dataset batch unchanged
    last = src(batch, 10)  # beta 0: every response is the student's greedy decoding
    greedy = rollout(student, None, batch.prompt_ids, batch.prompt_mask,
                     *spec(source="student", max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, vocab_size=vocab))
    P = batch.prompt_ids.shape[1]
    for i in range(8):
        want = greedy.sequences[i, P:][greedy.response_mask[i]].tolist()
        assert last.labels[i][last.labels[i] != -100].tolist() == want
    src.stats()
    for _ in range(20):
        src(batch, 5)  # beta 0.5: about half the rows are the student's
    share = src.stats()["imitkd/student_rows"] / (20 * 8)
    assert 0.35 < share < 0.65


@pytest.mark.parametrize("base,share", [(200.0, 0.81), (10.0, 0.61)])
def test_imitkd_exponential_schedule_is_the_official_one(base, share):
    """asappresearch/imitkd anneals beta_t = base^(-t/N); over a run the student writes 1 - (1 - 1/base)/ln(base)
    of the rows (81% with the translation configs' 200, 61% with the summarisation configs' 10)."""
    import math

    from switchkd.methods.imitkd import ImitkdSource

    cfg = load_config(None, ["method.source=imitkd", "method.divergence=fkl", "teacher.name=tiny:gpt2",
                             f"method.imitkd.base={base}"])
    assert cfg.method.imitkd.schedule == "exponential"
    src = ImitkdSource.__new__(ImitkdSource)
    src.cfg, src.run, src.settings = cfg, Run(total_steps=1000), cfg.method.imitkd
    betas = [src.beta(t) for t in range(1000)]
    assert betas[0] == 1.0 and all(b == pytest.approx(base ** (-t / 1000)) for t, b in enumerate(betas))
    assert 1 - sum(betas) / 1000 == pytest.approx(share, abs=0.005)
    assert 1 - sum(betas) / 1000 == pytest.approx(1 - (1 - 1 / base) / math.log(base), abs=1e-3)


def test_imitkd_argmax_targets_are_the_teachers_tokens_on_student_rows():
    """The paper's ImitKD: CE on the teacher's argmax over student prefixes, gold tokens on dataset rows."""
    from switchkd.config import ConfigError
    from switchkd.methods.imitkd import ImitkdSource

    cfg, student, teacher, tok, vocab, examples = _setup(["method.name=imitkd", "method.source=imitkd",
                                                          "method.divergence=ce", "method.kd_ratio=0",
                                                          "method.imitkd.targets=argmax", "method.max_new_tokens=8"])
    src = ImitkdSource(cfg, student, teacher, tok, vocab, seed=1)
    src.run = Run(total_steps=2)
    items, _ = tokenize(examples[:8], tok, 400, 600)
    batch = collate(items, tok.pad_token_id)
    draws = iter([1.0, 0.0] * 4)  # a row is the student's when its draw >= beta: even rows student, odd dataset
    src.rng.random = lambda: next(draws)
    out = src(batch, 1)
    with torch.no_grad():
        pred = teacher(out.input_ids, attention_mask=out.attention_mask).logits[:, :, :vocab].argmax(-1)
    changed = 0
    for i in range(8):
        m = out.labels[i, 1:] != -100
        if i % 2 == 0:  # a student row: the teacher's argmax after each student prefix
            assert torch.equal(out.labels[i, 1:][m], pred[i, :-1][m])
            changed += int((out.input_ids[i, 1:][m] != pred[i, :-1][m]).sum())
        else:  # a dataset row: its gold tokens
            assert out.labels[i, 1:][m].tolist() == items[i].response
    assert changed > 0
    with pytest.raises(ConfigError, match="method.divergence=ce"):
        load_config(None, ["method.source=imitkd", "method.imitkd.targets=argmax", "method.divergence=fkl",
                           "teacher.name=tiny:gpt2"])


def test_gkd_seq_kd_uses_teacher_samples_off_policy():
    from switchkd.methods.gkd import MixtureSource

    cfg, student, teacher, tok, vocab, examples = _setup(["method.name=gkd", "method.source=mixture",
                                                          "method.divergence=jsd", "method.mixture.student_ratio=0.0",
                                                          "method.mixture.seq_kd=true", "method.max_new_tokens=6",
                                                          "method.decoding.do_sample=false"])
    items, _ = tokenize(examples[:4], tok, 400, 600)
    batch = collate(items, tok.pad_token_id)
    out = MixtureSource(cfg, student, teacher, tok, vocab)(batch, 0)
    from engine_spec import spec

    from switchkd.rollout import rollout

    ref = rollout(None, teacher, batch.prompt_ids, batch.prompt_mask,
                  *spec(source="teacher", max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, vocab_size=vocab))
    P = batch.prompt_ids.shape[1]
    for i in range(4):
        assert out.labels[i][out.labels[i] != -100].tolist() == ref.sequences[i, P:][ref.response_mask[i]].tolist()


def test_distillm_validates_after_each_epoch_on_the_mean_of_batch_means(tmp_path):
    """Official finetune.py: evaluate() after every epoch on --dev-num dev examples, the loss being the
    mean over dev batches of each batch's mean token CE; p then follows on_validation's rule."""
    from switchkd.train import Trainer

    cfg = load_config(ROOT / "configs/tiny/distillm.yaml", [
        f"output.dir={tmp_path}", "data.synthetic_size=16", "train.batch_size=4", "train.max_steps=9",
        "train.eval_every=0", "eval.limit=2", "eval.max_new_tokens=4", "method.max_new_tokens=8",
        "method.distillm.dev_limit=10"])
    assert cfg.method.distillm.validate == "epoch"
    tr = Trainer(cfg)
    assert len(tr.source_dev) == 10 and len(tr.dev_items) == 2
    calls = []
    on_validation = tr.source.on_validation
    tr.source.on_validation = lambda loss: (calls.append((tr.state.step, loss)), on_validation(loss))
    tr.fit()
    assert [step for step, _ in calls] == [0, 4, 8]  # before training, then at the end of epochs 1 and 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_ce_epoch" in r] == [4, 8]
    # the reduction: recompute on the final student, batch by batch
    model = tr.acc.unwrap_model(tr.student).eval()
    means = []
    with torch.no_grad():
        for i in range(0, 10, 4):
            b = collate(tr.source_dev[i:i + 4], tr.tok.pad_token_id)
            logits, target = shifted(model(b.input_ids, attention_mask=b.attention_mask).logits, b.labels,
                                     tr.vocab)
            means.append(float(torch.nn.functional.cross_entropy(logits.float(), target)))
    got = tr._dev_loss(cross_entropy=True, items=tr.source_dev, batch_mean=True)
    assert got == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert got != pytest.approx(tr._dev_loss(cross_entropy=True, items=tr.source_dev), rel=1e-6)  # not the token mean
