"""The rollout engine against oracles: HF generate, recomputation of the SWITCH rule, row independence."""

from __future__ import annotations

import math

import pytest
import torch
from engine_spec import spec as engine_spec

from switchkd.config import ModelConfig
from switchkd.data import left_pad
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import GATES, rollout
from switchkd.rules import Gate

ARCHS = {
    "gpt2": ("tiny:gpt2,layers=2,dim=32,heads=2,seed=3", "tiny:gpt2,layers=3,dim=48,heads=4,seed=4"),
    "llama": ("tiny:llama,layers=2,dim=32,heads=4,kv_heads=2,seed=3", "tiny:llama,layers=3,dim=48,heads=4,kv_heads=2,seed=4"),
}
PROMPTS = ["Q: hi\nA: ", "Q: a rather longer question here?\nA: ", "Q: mid\nA: ", "x"]
N = 24


def _pair(arch):
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    s_spec, t_spec = ARCHS[arch]
    student = load_model(ModelConfig(name=s_spec), tok, trainable=False)
    teacher = load_model(ModelConfig(name=t_spec), tok, trainable=False)
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    return student, teacher, tok, ids, mask


def _hf_greedy(model, tok, ids, mask):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    full = torch.full((ids.shape[0], N), tok.pad_token_id)
    full[:, : out.shape[1]] = out
    return full


def _cfg(**kw):
    base = dict(source="switch", max_new_tokens=N, do_sample=False, tau0=0.2, decay=0.1, speculative=False)
    return engine_spec(**(base | kw))


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_switch_extremes_equal_hf_generate(arch, speculative):
    student, teacher, tok, ids, mask = _pair(arch)
    only_student = rollout(student, teacher, ids, mask, *_cfg(tau0=float("inf"), speculative=speculative))
    only_teacher = rollout(student, teacher, ids, mask, *_cfg(tau0=-1.0, speculative=speculative))
    assert torch.equal(only_student.sequences[:, ids.shape[1]:], _hf_greedy(student, tok, ids, mask))
    assert torch.equal(only_teacher.sequences[:, ids.shape[1]:], _hf_greedy(teacher, tok, ids, mask))
    assert not only_student.from_teacher.any()
    assert torch.equal(only_teacher.from_teacher, only_teacher.response_mask)
    # the single-model sources are the same decoder
    assert torch.equal(rollout(student, None, ids, mask, *_cfg(source="student")).sequences, only_student.sequences)
    assert torch.equal(rollout(None, teacher, ids, mask, *_cfg(source="teacher")).sequences, only_teacher.sequences)


def _recompute(model, seq, mask_prompt, vocab):
    """Next-token logits over the finished sequence, without a cache: [B, L, V]."""
    full_mask = torch.cat([mask_prompt, torch.ones(seq.shape[0], seq.shape[1] - mask_prompt.shape[1], dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=seq, attention_mask=full_mask, position_ids=pos).logits[..., :vocab].double()


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("gate,schedule", [("jsd", "exp"), ("tvd", "linear"), ("fkl", "const"), ("rkl", "exp")])
def test_switch_rule_confirmed_by_recomputation(arch, gate, schedule, speculative):
    student, teacher, tok, ids, mask = _pair(arch)
    vocab = len(tok)
    # pick tau0 so that both models write tokens: a quantile of the student-only gate values
    probe = rollout(student, teacher, ids, mask, *_cfg(tau0=float("inf"), gate=gate))
    for qtl in (0.5, 0.7, 0.9, 0.3, 0.97, 0.1):
        tau0 = float(probe.gate[probe.response_mask].quantile(qtl))
        cfg = _cfg(tau0=tau0, gate=gate, schedule=schedule, decay=0.02, vocab_size=vocab, speculative=speculative)
        out = rollout(student, teacher, ids, mask, *cfg)
        share = out.from_teacher[out.response_mask].float().mean()
        if 0.1 < share < 0.9:
            break
    P = ids.shape[1]
    ls = _recompute(student, out.sequences, mask, vocab)
    lt = _recompute(teacher, out.sequences, mask, vocab)
    n_teacher = n_student = 0
    for b in range(ids.shape[0]):
        for t in range(N):
            if not out.response_mask[b, t]:
                assert out.sequences[b, P + t] == tok.pad_token_id
                continue
            q, p = ls[b, P + t - 1], lt[b, P + t - 1]
            d = float(GATES[gate](q, p))
            tau = cfg[1].threshold(t)
            if abs(d - tau) < 1e-4:
                continue  # too close to call at float32 precision
            by_teacher = d > tau
            want = int(p.argmax()) if by_teacher else int(q.argmax())
            assert int(out.sequences[b, P + t]) == want
            assert bool(out.from_teacher[b, t]) == by_teacher
            assert abs(float(out.gate[b, t]) - d) < 1e-4
            n_teacher += by_teacher
            n_student += not by_teacher
    assert n_teacher > 0 and n_student > 0


def test_thresholds():
    c = Gate(tau0=0.5, decay=0.1)
    assert c.threshold(0) == 0.5 and c.threshold(10) == pytest.approx(0.5 * math.exp(-1))
    assert Gate(tau0=0.5, decay=0.1, schedule="linear").threshold(5) == pytest.approx(0.25)
    assert Gate(tau0=0.5, decay=0.1, schedule="linear").threshold(50) == 0.0
    assert Gate(tau0=0.5, schedule="const").threshold(7) == 0.5


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_rows_do_not_depend_on_the_batch(arch, speculative):
    student, teacher, tok, ids, mask = _pair(arch)
    cfg = _cfg(tau0=0.05, speculative=speculative)
    batched = rollout(student, teacher, ids, mask, *cfg)
    for b, p in enumerate(PROMPTS):
        one_ids, one_mask = left_pad([tok(p, add_special_tokens=False)["input_ids"]], tok.pad_token_id)
        single = rollout(student, teacher, one_ids, one_mask, *cfg)
        n = one_ids.shape[1]
        assert torch.equal(batched.sequences[b, -N:], single.sequences[0, n:])
        assert torch.equal(batched.from_teacher[b], single.from_teacher[0])


def test_sampled_rollouts_are_reproducible_and_seed_dependent():
    student, teacher, tok, ids, mask = _pair("llama")
    cfg = _cfg(do_sample=True, seed=123, top_k=50, top_p=0.9, temperature=0.8)
    a, b = rollout(student, teacher, ids, mask, *cfg), rollout(student, teacher, ids, mask, *cfg)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.from_teacher, b.from_teacher)
    c = rollout(student, teacher, ids, mask, *_cfg(do_sample=True, seed=124, top_k=50, top_p=0.9, temperature=0.8))
    assert not torch.equal(a.sequences, c.sequences)
    torch.manual_seed(5)
    d = rollout(student, None, ids, mask, *_cfg(source="student", do_sample=True))
    torch.manual_seed(5)
    e = rollout(student, None, ids, mask, *_cfg(source="student", do_sample=True))
    assert torch.equal(d.sequences, e.sequences)


@pytest.mark.parametrize("speculative", [False, True])
def test_kept_teacher_logits_equal_a_teacher_forward(speculative):
    student, teacher, tok, ids, mask = _pair("gpt2")
    out = rollout(student, teacher, ids, mask, *_cfg(tau0=0.05, keep_teacher_logits=True, vocab_size=len(tok),
                                                     speculative=speculative))
    lt = _recompute(teacher, out.sequences, mask, len(tok)).float()
    P = ids.shape[1]
    for b in range(ids.shape[0]):
        for t in range(N):
            if out.response_mask[b, t]:
                torch.testing.assert_close(out.teacher_logits[b, t], lt[b, P + t - 1], rtol=1e-4, atol=1e-4)


def test_eos_ends_a_row():
    student, teacher, tok, ids, mask = _pair("gpt2")
    greedy = rollout(student, None, ids, mask, *_cfg(source="student"))
    first = int(greedy.sequences[0, ids.shape[1]])
    out = rollout(student, None, ids, mask, *_cfg(source="student", eos_token_id=[tok.eos_token_id, first]))
    assert out.response_mask[0].tolist() == [True] + [False] * (N - 1)
    assert (out.sequences[0, ids.shape[1] + 1:] == tok.pad_token_id).all()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("quantile", [0.1, 0.5, 0.9])
def test_speculative_greedy_equals_lockstep(arch, quantile):
    student, teacher, tok, ids, mask = _pair(arch)
    probe = rollout(student, teacher, ids, mask, *_cfg(tau0=float("inf"), speculative=False))
    tau0 = float(probe.gate[probe.response_mask].quantile(quantile))
    for k in (1, 3, 8):
        lock = rollout(student, teacher, ids, mask, *_cfg(tau0=tau0, decay=0.02, speculative=False, keep_teacher_logits=True))
        spec = rollout(student, teacher, ids, mask, *_cfg(tau0=tau0, decay=0.02, speculative=True, draft_k=k,
                                                          keep_teacher_logits=True))
        assert torch.equal(lock.sequences, spec.sequences)
        assert torch.equal(lock.from_teacher, spec.from_teacher) and torch.equal(lock.response_mask, spec.response_mask)
        torch.testing.assert_close(spec.teacher_logits[spec.response_mask], lock.teacher_logits[lock.response_mask],
                                   rtol=1e-4, atol=1e-4)


def test_speculative_sampling_has_the_lockstep_distribution():
    """Many sampled rows of one prompt: token and teacher-share distributions agree (TV distance)."""
    student, teacher, tok, _, _ = _pair("gpt2")
    with torch.no_grad():  # peaky distributions so that empirical histograms are informative
        student.lm_head.weight.mul_(20)
        teacher.lm_head.weight.mul_(20)
    ids, mask = left_pad([tok("Q: hi\nA: ", add_special_tokens=False)["input_ids"]] * 3000, tok.pad_token_id)
    probe = rollout(student, teacher, ids[:50], mask[:50], *_cfg(tau0=float("inf"), speculative=False))
    tau0 = float(probe.gate[probe.response_mask].quantile(0.5))
    n = 6
    outs = {}
    for spec in (False, True):
        torch.manual_seed(11 if spec else 12)
        outs[spec] = rollout(student, teacher, ids, mask, *_cfg(tau0=tau0, decay=0.0, schedule="const", do_sample=True,
                                                              max_new_tokens=n, speculative=spec))
    P = ids.shape[1]
    for pos in range(n):
        a = torch.bincount(outs[False].sequences[:, P + pos], minlength=len(tok)).float() / ids.shape[0]
        b = torch.bincount(outs[True].sequences[:, P + pos], minlength=len(tok)).float() / ids.shape[0]
        assert 0.5 * (a - b).abs().sum() < 0.08, pos
        share = [float(outs[s].from_teacher[:, pos].float().mean()) for s in (False, True)]
        assert abs(share[0] - share[1]) < 0.05
    assert 0.05 < float(outs[True].from_teacher.float().mean()) < 0.95


def test_sampler_draws_from_the_warped_distribution():
    from switchkd.rollout import chooser as _chooser

    logits = torch.tensor([[0.0, 1.0, -2.0, float("-inf"), 0.5, -0.5]]).expand(60_000, -1)
    for cfg, expect in [(_cfg(do_sample=True), torch.softmax(logits[0], -1)),
                        (_cfg(do_sample=True, top_k=2), torch.softmax(torch.tensor([-1e9, 1.0, -1e9, -1e9, 0.5, -1e9]), -1))]:
        draws = _chooser(cfg[0], torch.Generator().manual_seed(0))(logits)
        freq = torch.bincount(draws, minlength=6).float() / draws.numel()
        assert (freq[expect == 0] == 0).all()
        torch.testing.assert_close(freq, expect, atol=0.01, rtol=0)


def test_draft_length_follows_rejection_rate_and_teacher_cost():
    from switchkd.speculative import next_k

    assert next_k(0.0, 3.0, 16) == 16 and next_k(0.95, 3.0, 16) == 1
    ks = [next_k(r, 3.0, 16) for r in (0.02, 0.1, 0.3, 0.6)]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1]
    assert next_k(0.3, 10.0, 16) > next_k(0.3, 1.0, 16)  # a dearer teacher: longer drafts
    r, c, k = 0.22, 3.0, next_k(0.22, 3.0, 16)  # the chosen k beats lockstep's cost per token
    assert (c + k) * r / (1 - (1 - r) ** k) < c + 1


def _eos_mid_batch(out, P):
    """An EOS list that ends some rows early: the token each row's greedy output has at position 5."""
    return sorted({int(x) for x in out.sequences[:2, P + 5]})


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("source", ["student", "teacher", "switch"])
def test_static_cache_path_equals_eager_token_for_token(arch, source, monkeypatch):
    """Static KV caches (holes-free lockstep, bucketed length) give the eager dynamic-cache tokens, EOS mid-batch
    included; the compile call itself is replaced by the plain forward here (one real compile test below)."""
    import switchkd.decoding as dec

    monkeypatch.setattr(dec, "compiled_forward", lambda model: model)
    student, teacher, tok, ids, mask = _pair(arch)
    base = dict(source=source, tau0=0.05, keep_teacher_logits=True, vocab_size=len(tok))
    eager = rollout(student, teacher, ids, mask, *_cfg(**base, compile=False))
    eos = [tok.eos_token_id] + _eos_mid_batch(eager, ids.shape[1])
    eager = rollout(student, teacher, ids, mask, *_cfg(**base, compile=False, eos_token_id=eos))
    static = rollout(student, teacher, ids, mask, *_cfg(**base, compile=True, eos_token_id=eos, sync_every=8))
    assert not eager.response_mask[:, -1].all()  # some row ended early
    assert torch.equal(eager.sequences, static.sequences)
    assert torch.equal(eager.response_mask, static.response_mask) and torch.equal(eager.from_teacher, static.from_teacher)
    if source != "student":
        torch.testing.assert_close(static.teacher_logits[static.response_mask], eager.teacher_logits[eager.response_mask],
                                   rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_equals_eager():
    """The real torch.compile'd one-token step (static caches) against the eager engine: SWITCH, greedy, fp32."""
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))  # one block each: inductor's compile time grows with depth
    student = load_model(ModelConfig(name="tiny:llama,layers=1,dim=32,heads=4,kv_heads=2,seed=3"), tok, trainable=False)
    teacher = load_model(ModelConfig(name="tiny:llama,layers=1,dim=48,heads=4,kv_heads=2,seed=4"), tok, trainable=False)
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    eager = rollout(student, teacher, ids, mask, *_cfg(tau0=0.05, compile=False))
    compiled = rollout(student, teacher, ids, mask, *_cfg(tau0=0.05, compile=True))
    assert torch.equal(eager.sequences, compiled.sequences) and torch.equal(eager.from_teacher, compiled.from_teacher)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_per_row_speculative_equals_lockstep_with_eos_mid_batch(arch):
    """Per-row acceptance: rows advance by different amounts per block, rows end at EOS at different times,
    and the tokens, teacher flags and gates still equal lockstep's."""
    student, teacher, tok, ids, mask = _pair(arch)
    probe = rollout(student, teacher, ids, mask, *_cfg(tau0=float("inf")))
    tau0 = float(probe.gate[probe.response_mask].quantile(0.8))
    eos = [tok.eos_token_id] + _eos_mid_batch(probe, ids.shape[1])
    lock = rollout(student, teacher, ids, mask, *_cfg(tau0=tau0, decay=0.02, eos_token_id=eos))
    spec = rollout(student, teacher, ids, mask, *_cfg(tau0=tau0, decay=0.02, eos_token_id=eos, speculative=True, draft_k=6))
    assert not lock.response_mask[:, -1].all() and lock.from_teacher.any()
    assert torch.equal(lock.sequences, spec.sequences) and torch.equal(lock.from_teacher, spec.from_teacher)
    torch.testing.assert_close(spec.gate[spec.response_mask], lock.gate[lock.response_mask], rtol=1e-4, atol=1e-5)


def test_one_rows_rejection_does_not_end_another_rows_block(monkeypatch):
    """Eight sampled rows, each rejected at ~10% of positions, at different positions (a hash gate of the
    two models' argmax tokens).  A block that ended at any row's rejection would need at least one teacher
    forward per position where some row is rejected; per-row acceptance needs far fewer."""
    import switchkd.decoding as dec

    monkeypatch.setitem(dec.GATES, "hash", lambda q, p: ((q.argmax(-1) * 7919 + p.argmax(-1) * 104729) % 997) / 997.0)
    student, teacher, tok, _, _ = _pair("llama")
    prompts = [f"Q: {w}\nA: " for w in ("hi", "mid", "a longer one", "x y z", "what?", "ok", "tell me", "why")]
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], tok.pad_token_id)
    n = 64
    cfg = _cfg(gate="hash", tau0=0.9, schedule="const", max_new_tokens=n, do_sample=True, seed=0, speculative=True,
               draft_k=8, teacher_cost=8.0, eos_token_id=[len(tok) + 1])
    spec = rollout(student, teacher, ids, mask, *cfg)
    share = float(spec.from_teacher.float().mean())
    union = int(spec.from_teacher.any(0).sum())  # positions where some row is rejected
    assert 0.05 < share < 0.2 and union > 2 * n * share
    assert spec.forwards["teacher"] < 0.7 * union, (spec.forwards, union)
