"""Drafted rollouts (:mod:`switchkd.drafted`: vLLM drafts, in-process or served verification) against the
in-process engines and float64 recomputations of the rule, with drafters built from the student in torch (the
real vLLM drafter: tests/test_vllm_engine.py)."""

from __future__ import annotations

import math

import pytest
import torch
from engine_spec import spec

from switchkd.config import ModelConfig
from switchkd.data import left_pad
from switchkd.divergences import TopKTail, with_tail
from switchkd.drafted import drafted_rollout
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import GATES, rollout

PROMPTS = ["Q: hi\nA: ", "Q: a rather longer question here?\nA: ", "Q: mid\nA: ", "x"]
N = 20


@pytest.fixture(scope="module")
def pair():
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    student = load_model(ModelConfig(name="tiny:llama,layers=2,dim=32,heads=4,kv_heads=2,seed=3"), tok, trainable=False)
    teacher = load_model(ModelConfig(name="tiny:llama,layers=3,dim=48,heads=4,kv_heads=2,seed=4"), tok, trainable=False)
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    return student.eval(), teacher.eval(), tok, ids, mask


class TorchDrafter:
    """The student's continuations from switchkd's engine (greedy or sampled), or uniformly random tokens; every
    call's drafts are logged."""

    def __init__(self, student, pad: int, random_tokens: bool = False) -> None:
        self.student, self.pad, self.random_tokens, self.calls = student, pad, random_tokens, []

    def sample(self, prompts, max_new_tokens, decoding, eos_token_id, seed, greedy=False):
        gen = torch.Generator().manual_seed(seed % (2 ** 62))
        if self.random_tokens:
            out = [torch.randint(0, 200, (max_new_tokens,), generator=gen).tolist() for _ in prompts]
        else:
            ids, mask = left_pad([list(p) for p in prompts], self.pad)
            cfg = spec(source="student", max_new_tokens=max_new_tokens, do_sample=not greedy, seed=seed % 2 ** 62,
                                eos_token_id=eos_token_id, pad_token_id=self.pad,
                                vocab_size=self.student.config.vocab_size)
            out = rollout(self.student, None, ids, mask, *cfg).responses(ids.shape[1])
        self.calls.append(out)
        return out


class TopKServer:
    """A teacher 'on a server' from an in-process model: its top ``top_k`` log-probabilities per position and its
    greedy tokens, as :class:`switchkd.served.ServedTeacher` returns them."""

    served = True

    def __init__(self, model, top_k: int) -> None:
        self.model, self.top_k = model, top_k

    def next_tokens(self, prompts, decoding, eos_token_id, seed=None):
        out = []
        for p in prompts:
            with torch.no_grad():
                lp = torch.log_softmax(self.model(torch.tensor([p])).logits[0, -1].double(), -1)
            top = lp.topk(self.top_k)
            out.append((int(lp.argmax()), top.indices.tolist(), top.values.tolist()))
        return out

    def sample(self, prompts, max_new_tokens, decoding, eos_token_id, seed=None):
        with torch.no_grad():
            return [[int(self.model(torch.tensor([p])).logits[0, -1].argmax())] for p in prompts]


@pytest.fixture(scope="module")
def peaky(pair):
    """The pair with logits scaled by 20 (informative histograms for the distribution test)."""
    import copy

    student, teacher, tok, ids, mask = pair
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    with torch.no_grad():
        student.lm_head.weight.mul_(20)
        teacher.lm_head.weight.mul_(20)
    return student, teacher, tok, ids, mask


@pytest.fixture(scope="module")
def ranked(pair):
    """The pair with the teacher's LM head untied and perturbed (noise 4x its spread): the student's greedy tokens
    (it repeats its last token, as the tied tiny models do) then sit at varied ranks under the teacher."""
    import copy

    student, teacher, tok, ids, mask = pair
    teacher = copy.deepcopy(teacher)
    weight = teacher.lm_head.weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    teacher.lm_head.weight = torch.nn.Parameter(weight + 4 * weight.std() * noise)
    return student, teacher, tok, ids, mask


def _cfg(**kw):
    base = dict(source="switch", max_new_tokens=N, do_sample=False, schedule="const", eos_token_id=1, pad_token_id=0,
                vocab_size=384, seed=5)
    return spec(**(base | kw))


def _median_gate(student, teacher, ids, mask, drafter=None, **kw):
    """The median gate of a rollout in which the student writes everything (a tau0 at which both models write)."""
    cfg = _cfg(tau0=float("inf"), **kw)
    out = drafted_rollout(drafter, student, teacher, ids, mask, *cfg) if drafter else rollout(student, teacher, ids, mask, *cfg)
    return float(out.gate[out.response_mask].median())


def _recomputed(student, teacher, out, ids, mask, cfg, top_k=None):
    """Per response position ``[B, N]``: the gate in float64 from full forwards of the final sequences (over the
    teacher's top k + tail with ``top_k``), tau_t and the teacher's argmax."""
    seq = out.sequences
    full_mask = torch.cat([mask, out.response_mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    P, V = ids.shape[1], cfg[0].vocab_size
    with torch.no_grad():
        q = student(input_ids=seq, attention_mask=full_mask, position_ids=pos).logits[:, P - 1:-1, :V].double()
        p = teacher(input_ids=seq, attention_mask=full_mask, position_ids=pos).logits[:, P - 1:-1, :V].double()
    if top_k is None:
        gate = GATES[cfg[1].divergence](q, p)
    else:
        lp = torch.log_softmax(p, -1)
        top = lp.topk(top_k, -1)
        lq, lpt = with_tail(q.reshape(-1, V), TopKTail(top.values.reshape(-1, top_k), top.indices.reshape(-1, top_k), V))
        gate = GATES[cfg[1].divergence](lq, lpt).reshape(q.shape[:2])
    tau = cfg[1].thresholds(torch.arange(cfg[0].max_new_tokens).expand_as(gate))
    return gate, tau, p.argmax(-1)


@pytest.mark.parametrize("gate", ["jsd", "rank"])
def test_greedy_drafts_give_the_speculative_engines_tokens_and_decisions(pair, ranked, gate):
    student, teacher, tok, ids, mask = ranked if gate == "rank" else pair
    kw = dict(gate=gate)
    cfg = _cfg(tau0=_median_gate(student, teacher, ids, mask, **kw) + (0.5 if gate == "rank" else 0.0), **kw)
    own = rollout(student, teacher, ids, mask, *cfg)
    drafted = drafted_rollout(TorchDrafter(student, tok.pad_token_id), student, teacher, ids, mask, *cfg)
    assert torch.equal(drafted.sequences, own.sequences)
    assert torch.equal(drafted.from_teacher, own.from_teacher) and torch.equal(drafted.response_mask, own.response_mask)
    assert 0 < int(own.from_teacher.sum()) < int(own.response_mask.sum())  # both models wrote
    m = own.response_mask
    assert torch.allclose(drafted.gate[m], own.gate[m], atol=1e-5)


def test_any_drafts_are_decided_by_the_rule(pair):
    """Random drafts: at every decided position the gate equals a float64 recomputation, the teacher wrote exactly
    where it exceeds tau_t, and its tokens are its argmax; the student's tokens are drafts."""
    student, teacher, tok, ids, mask = pair
    drafter = TorchDrafter(student, tok.pad_token_id, random_tokens=True)
    cfg = _cfg(tau0=_median_gate(student, teacher, ids, mask, drafter))
    out = drafted_rollout(drafter, student, teacher, ids, mask, *cfg)
    gate, tau, argmax = _recomputed(student, teacher, out, ids, mask, cfg)
    m = out.response_mask
    assert torch.allclose(out.gate[m].double(), gate[m], atol=1e-5)
    assert torch.equal(out.from_teacher[m], (gate > tau)[m])
    resp = out.sequences[:, ids.shape[1]:]
    assert torch.equal(resp[out.from_teacher], argmax[out.from_teacher])
    drafted = {t for call in drafter.calls for row in call for t in row}
    assert set(resp[m & ~out.from_teacher].tolist()) <= drafted
    assert int(out.from_teacher.sum()) > 0 and int((m & ~out.from_teacher).sum()) > 0


def test_the_served_gate_reads_the_teachers_top_k_and_tail(pair):
    """With the teacher 'on a server' (its top 8 + tail): the gate equals a float64 recomputation over those k + 1
    outcomes and the teacher's tokens are its own."""
    student, teacher, tok, ids, mask = pair
    drafter, server = TorchDrafter(student, tok.pad_token_id, random_tokens=True), TopKServer(teacher, 8)
    cfg = _cfg(tau0=_median_gate(student, server, ids, mask, drafter))
    out = drafted_rollout(drafter, student, server, ids, mask, *cfg)
    gate, tau, argmax = _recomputed(student, teacher, out, ids, mask, cfg, top_k=8)
    m = out.response_mask
    assert torch.allclose(out.gate[m].double(), gate[m], atol=1e-4)
    assert torch.equal(out.from_teacher[m], (gate > tau)[m])
    resp = out.sequences[:, ids.shape[1]:]
    assert torch.equal(resp[out.from_teacher], argmax[out.from_teacher])
    assert out.teacher_logits is None and 0 < int(out.from_teacher.sum()) < int(m.sum())


def test_served_rank_gate_is_the_exact_rank_within_the_top_k(ranked):
    student, teacher, tok, ids, mask = ranked
    cfg = _cfg(gate="rank", tau0=4.5)
    exact = drafted_rollout(TorchDrafter(student, tok.pad_token_id), student, teacher, ids, mask, *cfg)
    served = drafted_rollout(TorchDrafter(student, tok.pad_token_id), student, TopKServer(teacher, 8), ids, mask, *cfg)
    assert torch.equal(served.sequences, exact.sequences) and torch.equal(served.from_teacher, exact.from_teacher)
    assert 0 < int(exact.from_teacher.sum()) < int(exact.response_mask.sum())


def test_mixed_drafts_sample_the_teacher_mixed_distribution(peaky):
    """MiniLLM's mixture a p + (1 - a) q at the first response token (600 rows, a = 0.3): a chi-square test on the
    most likely tokens; the recorded log-probabilities are the student's."""
    student, teacher, tok, ids, mask = peaky
    prompt = ids[1:2, :].expand(600, -1)
    pmask = mask[1:2].expand(600, -1)
    cfg = _cfg(source="mixed", do_sample=True, teacher_mix=0.3, max_new_tokens=1, keep_teacher_logits=True)
    out = drafted_rollout(TorchDrafter(student, tok.pad_token_id), student, teacher, prompt, pmask, *cfg)
    first = out.sequences[:, ids.shape[1]]
    with torch.no_grad():
        q = torch.softmax(student(ids[1:2], attention_mask=mask[1:2]).logits[0, -1].double(), -1)
        p = torch.softmax(teacher(ids[1:2], attention_mask=mask[1:2]).logits[0, -1].double(), -1)
    mix = 0.3 * p + 0.7 * q
    top = mix.topk(6).indices
    counts = torch.stack([(first == c).sum() for c in top]).double()
    counts = torch.cat([counts, (600 - counts.sum())[None]])
    expected = torch.cat([mix[top], (1 - mix[top].sum())[None]]) * 600
    assert float(((counts - expected) ** 2 / expected).sum()) < 22.458  # chi-square 0.999 quantile, 6 dof
    assert torch.allclose(out.logprobs[:, 0].double(), torch.log(q[first]), atol=1e-4)
    assert out.teacher_logits.shape == (600, 1, 384)


def test_mixed_with_no_teacher_share_is_the_students_drafts(pair):
    student, teacher, tok, ids, mask = pair
    cfg = _cfg(source="mixed", teacher_mix=0.0)
    out = drafted_rollout(TorchDrafter(student, tok.pad_token_id), student, teacher, ids, mask, *cfg)
    own = rollout(student, None, ids, mask, *_cfg(source="student"))
    assert 1 < int(out.response_mask.sum(1).min())
    assert torch.equal(out.sequences, own.sequences) and not bool(out.from_teacher.any())
    assert math.isfinite(float(out.logprobs[out.response_mask].sum()))
