"""The teacher top-k cache: exact for topk_kl, a measured approximation elsewhere, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from switchkd.cli import main
from switchkd.config import ConfigError, load_config
from switchkd.divergences import DIVERGENCES, TopK, divergence
from switchkd.teacher_cache import rebuild
from switchkd.train import train

BASE = ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=2,dim=48,heads=4,seed=3",
        "data.synthetic_size=16", "data.max_prompt_length=128", "data.max_length=320", "data.dev=null",
        "train.max_steps=3", "train.batch_size=4", "method.name=kd", "method.divergence=fkl"]


def test_rebuild_keeps_top_k_and_total_mass():
    logits = torch.randn(5, 40, dtype=torch.float64) * 3
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(8, -1)
    full = rebuild(top.values, top.indices, 40)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(full.gather(-1, top.indices), top.values)
    torch.testing.assert_close(rebuild(lp, torch.arange(40).expand(5, -1), 40), lp)  # k = V: exact


@pytest.mark.parametrize("k", [1, 7, 40])
def test_sparse_fkl_and_topk_kl_equal_the_rebuilt_distribution_in_value_and_gradient(k):
    torch.manual_seed(k)
    s = (torch.randn(6, 40, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, 40, dtype=torch.float64) * 4
    t[0, 5] = float("-inf")  # a masked teacher entry (p = 0) may sit in the top-k at k = V
    lp = torch.log_softmax(t, -1).topk(k, -1)
    cache = TopK(lp.values, lp.indices, 40)
    cases = [("fkl", {}), ("topk_kl", {"k": k}), ("topk_kl", {"k": max(1, k // 2)})]
    for name, params in cases:
        sparse = divergence(name, s, cache, temperature=1.0, **params)
        dense = DIVERGENCES[name](s, cache.dense(), **params)
        torch.testing.assert_close(sparse, dense)
        g_sparse, = torch.autograd.grad(sparse.sum(), s)
        g_dense, = torch.autograd.grad(dense.sum(), s)
        torch.testing.assert_close(g_sparse, g_dense)


def test_cached_targets_fall_back_to_the_rebuilt_distribution():
    torch.manual_seed(0)
    s, t = torch.randn(5, 30, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64) * 2
    top = torch.log_softmax(t, -1).topk(6, -1)
    cache = TopK(top.values, top.indices, 30)
    for name, params in [("fkl", {"temperature": 2.0}), ("jsd", {"beta": 0.5}), ("bild", {"k": 4}),
                         ("topk_kl", {"k": 12})]:
        torch.testing.assert_close(divergence(name, s, cache, **params), divergence(name, s, cache.dense(), **params))
    torch.testing.assert_close(cache[1:3].dense(), cache.dense()[1:3])


def test_cache_error_shrinks_with_k_and_topk_kl_is_exact():
    torch.manual_seed(0)
    s, t = torch.randn(64, 384) * 2, torch.randn(64, 384) * 4
    lp = torch.log_softmax(t, -1)
    errs = {}
    for k in (8, 64):
        top = lp.topk(k, -1)
        cached = rebuild(top.values, top.indices, 384)
        torch.testing.assert_close(DIVERGENCES["topk_kl"](s, cached, k=k), DIVERGENCES["topk_kl"](s, t, k=k),
                                   rtol=1e-4, atol=1e-5)
        full = DIVERGENCES["fkl"](s, t)
        errs[k] = float(((DIVERGENCES["fkl"](s, cached) - full).abs() / full).mean())
    assert errs[64] < errs[8] < 0.5


def test_training_from_the_cache_equals_online_topk_kd(tmp_path):
    over = ["method.divergence=topk_kl", "method.params.k=16"]
    rc = main(["cache-teacher", "configs/tiny/kd.yaml", *BASE, *over, "--output", str(tmp_path / "c"), "--k", "16"])
    assert rc == 0
    online = train(load_config(None, BASE + over + [f"output.dir={tmp_path / 'on'}"]))
    cached = train(load_config(None, BASE + over + [f"method.teacher_cache={tmp_path / 'c'}", "teacher.name=absent/model",
                                                    f"output.dir={tmp_path / 'off'}"]))
    a, b = load_file(online / "model.safetensors"), load_file(cached / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_chunked_loss_from_the_cache_equals_the_whole_loss(tmp_path):
    main(["cache-teacher", "configs/tiny/kd.yaml", *BASE, "--output", str(tmp_path / "c"), "--k", "8"])
    over = [f"method.teacher_cache={tmp_path / 'c'}", "teacher.name=absent/model"]
    whole = train(load_config(None, BASE + over + [f"output.dir={tmp_path / 'w'}"]))
    chunked = train(load_config(None, BASE + over + ["train.loss_chunk=16", f"output.dir={tmp_path / 'ch'}"]))
    a, b = load_file(whole / "model.safetensors"), load_file(chunked / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_cache_mismatch_and_misuse_are_clear_errors(tmp_path):
    main(["cache-teacher", "configs/tiny/kd.yaml", *BASE, "--output", str(tmp_path / "c"), "--k", "8"])
    with pytest.raises(ConfigError, match="tokens for example|not in the teacher cache"):
        train(load_config(None, BASE + ["data.max_length=200", f"method.teacher_cache={tmp_path / 'c'}",
                                        "data.synthetic_size=40", f"output.dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="method.source=dataset only"):
        load_config(None, BASE + ["method.source=student", f"method.teacher_cache={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match="not a directory .run switchkd cache-teacher first"):
        train(load_config(None, BASE + [f"method.teacher_cache={tmp_path / 'none'}", f"output.dir={tmp_path / 'y'}"]))
