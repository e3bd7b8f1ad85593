"""Every registry divergence against a float64 brute-force reference, and jsd against TRL."""

from __future__ import annotations

import math

import pytest
import torch

from switchkd.divergences import DIVERGENCES, bild, divergence

torch.manual_seed(0)



@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same random logits whatever ran before it (order-independent, not flaky)."""
    torch.manual_seed(1234)

def _probs(logits, t=1.0):
    z = [x / t for x in logits]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def brute(name, s_logits, t_logits, t=1.0, **kw):
    """Reference value for one position, from plain Python floats."""
    p, q = _probs(t_logits, t), _probs(s_logits, t)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "jsd":
        b = kw["beta"]
        m = [b * x + (1 - b) * y for x, y in zip(p, q)]
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skl":
        a = kw["alpha"]
        return _kl(p, [a * x + (1 - a) * y for x, y in zip(p, q)])
    if name == "srkl":
        a = kw["alpha"]
        return _kl(q, [(1 - a) * x + a * y for x, y in zip(p, q)])
    if name == "topk_kl":
        ids = sorted(range(len(p)), key=lambda i: -p[i])[: kw["k"]]
        pk, qk = [p[i] for i in ids], [q[i] for i in ids]
        return _kl(pk + [max(1 - sum(pk), 0.0)], qk + [max(1 - sum(qk), 1e-300)])
    if name == "topk_kl_renorm":  # BiLD's top_kl_loss: softmax over the teacher's top-k logits only
        ids = sorted(range(len(t_logits)), key=lambda i: -t_logits[i])[: kw["k"]]
        return _kl(_probs([t_logits[i] for i in ids], t), _probs([s_logits[i] for i in ids], t))
    if name == "bild":
        k = kw["k"]
        total = 0.0
        for lead_is_teacher in (True, False):
            lead = t_logits if lead_is_teacher else s_logits
            ids = sorted(range(len(lead)), key=lambda i: -lead[i])[:k]
            pairs = [(i, j) for a, i in enumerate(ids) for j in ids[a + 1:]]
            dt = [(t_logits[i] - t_logits[j]) / t for i, j in pairs]
            ds = [(s_logits[i] - s_logits[j]) / t for i, j in pairs]
            total += _kl(_probs(dt), _probs(ds))
        return total
    raise KeyError(name)


CASES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}),
         ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.1}), ("skl", {"alpha": 0.5}), ("topk_kl", {"k": 5}),
         ("topk_kl", {"k": 17}), ("topk_kl_renorm", {"k": 5}), ("topk_kl_renorm", {"k": 17}),
         ("bild", {"k": 8}), ("bild", {"k": 3})]


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_brute_force(name, kw, temperature):
    s = torch.randn(3, 4, 17, dtype=torch.float64) * 2
    t = torch.randn(3, 4, 17, dtype=torch.float64) * 2
    got = DIVERGENCES[name](s, t, temperature=temperature, **kw)
    assert got.shape == (3, 4)
    want = torch.tensor([[brute(name, s[i, j].tolist(), t[i, j].tolist(), temperature, **kw) for j in range(4)]
                         for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_float32_close_to_float64():
    s, t = torch.randn(2, 5, 50, dtype=torch.float64), torch.randn(2, 5, 50, dtype=torch.float64)
    for name, kw in CASES:
        torch.testing.assert_close(DIVERGENCES[name](s.float(), t.float(), **kw).double(),
                                   DIVERGENCES[name](s, t, **kw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_equals_trl(beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    s, t = torch.randn(2, 6, 33), torch.randn(2, 6, 33)
    ref = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="sum")
    ours = DIVERGENCES["jsd"](s, t, beta=beta, temperature=temperature).sum()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", CASES)
def test_neg_inf_logits_give_no_nan(name, kw):
    s = torch.randn(4, 20, requires_grad=True)
    t = torch.randn(4, 20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[15:] = True  # padded vocabulary rows masked out in both models
    s_masked = s.masked_fill(mask, float("-inf"))
    t_masked = t.masked_fill(mask, float("-inf"))
    val = DIVERGENCES[name](s_masked, t_masked, **kw)
    assert torch.isfinite(val).all()
    val.sum().backward()
    assert torch.isfinite(s.grad).all()
    if name != "bild":  # bild's top-k of 15 finite entries is unaffected by the masked tail
        unmasked = DIVERGENCES[name](s[:, :15], t[:, :15], **kw)
        torch.testing.assert_close(val, unmasked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "bild"])
def test_zero_at_equality_and_nonnegative(name, kw):
    x = torch.randn(8, 30, dtype=torch.float64)
    torch.testing.assert_close(DIVERGENCES[name](x, x.clone(), **kw), torch.zeros(8, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert (DIVERGENCES[name](torch.randn(8, 30), torch.randn(8, 30), **kw) >= -1e-6).all()


def test_bild_rejects_small_k():
    with pytest.raises(ValueError, match="k >= 3"):
        bild(torch.randn(2, 10), torch.randn(2, 10), k=2)


def test_bild_gradient_flows_only_to_student():
    s = torch.randn(3, 12, requires_grad=True)
    t = torch.randn(3, 12, requires_grad=True)
    bild(s, t).sum().backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_ce_matches_cross_entropy_and_ignores_padding():
    s = torch.randn(6, 11)
    labels = torch.tensor([1, 2, -100, 4, 5, -100])
    got = divergence("ce", s, None, labels=labels)
    ref = torch.nn.functional.cross_entropy(s, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, ref)


def test_jsd_beta_limits_are_kls():
    s, t = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(DIVERGENCES["jsd"](s, t, beta=0.0), DIVERGENCES["fkl"](s, t))
    torch.testing.assert_close(DIVERGENCES["jsd"](s, t, beta=1.0), DIVERGENCES["rkl"](s, t))


def test_topk_kl_with_full_k_is_forward_kl():
    s, t = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(DIVERGENCES["topk_kl"](s, t, k=9), DIVERGENCES["fkl"](s, t), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] in ("fkl", "rkl", "jsd", "skl", "srkl")])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_form_student_gradient_equals_autograd_of_the_definition(name, kw, temperature):
    from switchkd.divergences import _value, log_probs

    s = (torch.randn(5, 23, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(5, 23, dtype=torch.float64) * 2
    t[:, -2:] = float("-inf")  # masked teacher entries
    up = torch.randn(5, dtype=torch.float64)  # a non-uniform upstream gradient
    got, = torch.autograd.grad((DIVERGENCES[name](s, t, temperature=temperature, **kw) * up).sum(), s)
    kind, w = ("rkl" if kw.get("beta") == 1 else "fkl" if kw.get("beta") == 0 else name), kw.get("beta", kw.get("alpha", 0.0))
    ref = _value(kind, log_probs(s, temperature), log_probs(t, temperature), w)  # plain autograd
    want, = torch.autograd.grad((ref * up).sum(), s)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    t_req = t.clone().requires_grad_()  # a teacher that needs a gradient takes the autograd path
    both = DIVERGENCES[name](s, t_req, temperature=temperature, **kw).sum()
    assert torch.autograd.grad(both, t_req)[0].abs().sum() > 0


def test_the_config_checks_know_every_registry_divergence():
    """The torch-free table the config checks use (switchkd/divergence_table.py) declares every registry divergence
    with exactly its function's keyword-only parameters, and every served divergence exists."""
    import inspect

    from switchkd.checks import DIVERGENCE_PARAMS
    from switchkd.divergence_table import PARAMS, SERVED

    signatures = {name: tuple(p.name for p in inspect.signature(fn).parameters.values()
                              if p.kind == p.KEYWORD_ONLY and p.name not in ("temperature", "labels"))
                  for name, fn in DIVERGENCES.items()}
    assert DIVERGENCE_PARAMS == PARAMS == signatures
    assert set(SERVED) <= set(DIVERGENCES)
    assert PARAMS["jsd"] == ("beta",) and PARAMS["bild"] == ("k",) and PARAMS["fkl"] == ()
