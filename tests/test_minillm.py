"""MiniLLM: rewards, advantages, the clipped policy term and the single-step term against TRL 1.0's
MiniLLM trainer and the official LMOps code (transcribed in ``oracle_minillm.py``); the teacher-mixed
sampler's distribution; the source's fields and PPO-epoch reuse on tiny models; the preset trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from learning import assert_learns
from oracle_minillm import (
    lmops_get_advantages_and_returns,
    lmops_pg_loss,
    lmops_reg_loss,
    lmops_rewards_and_weight,
    trl_compute_advantage,
    trl_grpo_clipped_loss,
    trl_single_step_decomposition_loss,
)

from switchkd.batch import PolicyTerm
from switchkd.config import MethodConfig, load_config
from switchkd.divergences import divergence
from switchkd.losses import policy_loss
from switchkd.methods.minillm import advantages, importance_weight, rewards

ROOT = Path(__file__).resolve().parents[1]
B, T, V = 3, 7, 11


def _batch(seed: int, lengths=(7, 7, 7)):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    lp = lambda z: torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)  # noqa: E731
    return s_logits, t_logits, y, mask, lp(s_logits), lp(t_logits)


@pytest.mark.parametrize("gamma,norm", [(0.0, True), (0.0, False), (0.9, True)])
def test_advantages_equal_trl(gamma, norm):
    """TRL's _compute_advantage (full-length rows: TRL pads lengths with 1e-4 past a row's end).  With
    gamma > 0 and no length normalisation TRL discounts from position 0 (sum_i gamma^i R_i, not its
    docstring's gamma^(i-t)); ours follows the docstring and LMOps (checked by brute force below)."""
    _, _, _, mask, s_lp, t_lp = _batch(0)
    want = trl_compute_advantage(s_lp, t_lp, mask, gamma=gamma, length_normalization=norm)
    got = advantages(rewards(t_lp, s_lp, mask), mask, gamma, "discounted" if norm else "none")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if gamma == 0.0:  # with padding too (TRL's gamma = 0 branch is the plain reward)
        _, _, _, mask, s_lp, t_lp = _batch(1, (7, 4, 1))
        got = advantages(rewards(t_lp, s_lp, mask), mask, 0.0, "discounted" if norm else "none")
        torch.testing.assert_close(got.double(), trl_compute_advantage(s_lp, t_lp, mask) * mask, rtol=1e-6, atol=1e-6)


def test_reward_to_go_by_brute_force():
    _, _, _, mask, s_lp, t_lp = _batch(5, (7, 4, 2))
    r = rewards(t_lp, s_lp, mask)
    for norm in ("none", "count", "discounted"):
        got = advantages(r, mask, 0.8, norm)
        for b in range(B):
            n = int(mask[b].sum())
            for t in range(n):
                num = sum(0.8 ** (i - t) * float(r[b, i]) for i in range(t, n))
                den = {"none": 1.0, "count": n - t, "discounted": sum(0.8 ** (i - t) for i in range(t, n))}[norm]
                assert abs(float(got[b, t]) - num / den) < 1e-5
            assert (got[b, n:] == 0).all()


def test_single_step_and_policy_terms_equal_trl_in_value_and_gradient():
    s_logits, t_logits, y, mask, s_lp, t_lp = _batch(2, (7, 5, 2))
    adv = trl_compute_advantage(s_lp, t_lp, mask, gamma=0.9) * mask
    old = s_lp + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # ratio != 1

    a = s_logits.clone().requires_grad_(True)
    lp = torch.log_softmax(a, -1)
    trl = trl_single_step_decomposition_loss(lp, torch.log_softmax(t_logits, -1), mask) + \
        trl_grpo_clipped_loss(lp.gather(-1, y[..., None]).squeeze(-1), old, adv, mask)
    trl.backward()

    b = s_logits.clone().requires_grad_(True)
    pg = PolicyTerm(adv[mask], old[mask], torch.ones_like(old[mask]), 0.2)
    ours = (divergence("rkl", b[mask], t_logits[mask]) + policy_loss(b[mask], y[mask], pg)).sum() / mask.sum()
    ours.backward()
    torch.testing.assert_close(ours.double(), trl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    assert (torch.exp(s_lp - old)[mask] - 1).abs().max() > 0.2  # the clip was active somewhere


def test_rewards_advantages_weights_and_losses_equal_lmops():
    """LMOps' rules with its script's settings (gamma 0.95, length-norm, whitening, reward scaling 0.5,
    clip 100, teacher-mixed alpha 0.2, cliprange 0.2), rows of different lengths."""
    s_logits, t_logits, y, mask, s_lp, t_lp = _batch(4, (7, 3, 5))
    want_r, want_w = lmops_rewards_and_weight(t_lp, s_lp, mask, 0.2, 0.5, 100.0)
    r = rewards(t_lp, s_lp, mask, 0.5, 100.0)
    torch.testing.assert_close(r, want_r)
    w = importance_weight(s_lp, t_lp, 0.2)
    torch.testing.assert_close(w[mask], want_w[mask])
    adv = advantages(r, mask, 0.95, "count", whitened=True)
    want_adv = lmops_get_advantages_and_returns(want_r, T, mask, 0.95)
    torch.testing.assert_close(adv.double(), want_adv.double(), rtol=1e-5, atol=1e-6)

    old = s_lp - 0.25  # a later PPO epoch: the policy moved
    pg = PolicyTerm(adv[mask].double(), old[mask], w[mask], 0.2)
    got = policy_loss(s_logits[mask], y[mask], pg).sum() / mask.sum()
    torch.testing.assert_close(got.double(), lmops_pg_loss(s_lp, old, want_adv.double(), mask.double(), want_w))
    reg = divergence("rkl", s_logits[mask], t_logits[mask]).sum() / mask.sum()
    torch.testing.assert_close(reg.double(), lmops_reg_loss(s_logits, t_logits, mask.double()).double(),
                               rtol=1e-6, atol=1e-7)


def test_mixed_sampling_draws_from_the_teacher_mixture():
    from engine_spec import spec
    from test_rollout import _pair

    from switchkd.data import left_pad
    from switchkd.decoding import mix_logits
    from switchkd.rollout import rollout

    student, teacher, tok, _, _ = _pair("gpt2")
    with torch.no_grad():  # peaky, different distributions
        student.lm_head.weight.mul_(20)
        teacher.lm_head.weight = torch.nn.Parameter(torch.randn(teacher.lm_head.weight.shape,
                                                                generator=torch.Generator().manual_seed(0)))  # untied
    ids, mask = left_pad([tok("Q: hi\nA: ", add_special_tokens=False)["input_ids"]] * 4000, tok.pad_token_id)
    cfg = spec(source="mixed", max_new_tokens=1, teacher_mix=0.3, seed=5, vocab_size=len(tok))
    out = rollout(student, teacher, ids, mask, *cfg)
    with torch.no_grad():
        q, p = student(ids[:1], attention_mask=mask[:1]).logits[0, -1], teacher(ids[:1], attention_mask=mask[:1]).logits[0, -1]
    want = mix_logits(q[:len(tok)], p[:len(tok)], 0.3).exp()
    freq = torch.bincount(out.sequences[:, -1], minlength=len(tok)).float() / ids.shape[0]
    assert 0.5 * (freq - want).abs().sum() < 0.05
    assert 0.5 * (torch.softmax(q[:len(tok)], -1) - want).abs().sum() > 0.15  # the mixture is not the student's


def test_source_fields_are_recomputed_and_reused_for_ppo_epochs(tmp_path):
    from switchkd.data import build_batch
    from switchkd.methods import make_source
    from switchkd.models import load_pair

    cfg = load_config(ROOT / "configs/tiny/minillm.yaml", ["method.max_new_tokens=12", "method.minillm.ppo_epochs=2",
                                                          f"output.dir={tmp_path}"])
    student, teacher, tok, vocab = load_pair(cfg.model, cfg.teacher)
    prompts = [tok("Q: add 1 2\nA: ")["input_ids"], tok("Q: hello there\nA: ")["input_ids"]]
    batch = build_batch(prompts, [[5, 6], [7]], tok.pad_token_id, [0, 1])
    src = make_source(cfg, student, teacher, tok, vocab, seed=3)
    drawn = []

    def batches():
        while True:
            drawn.append(1)
            yield batch

    it = batches()
    [a], [b], [c] = src.step_batches(it, 0, 1), src.step_batches(it, 1, 1), src.step_batches(it, 2, 1)
    assert len(drawn) == 2  # the second step reuses the held rollout without drawing a prompt batch
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.policy.advantage, b.policy.advantage)
    assert not torch.equal(a.input_ids, c.input_ids)  # a fresh rollout after ppo_epochs uses
    # the fields, recomputed from plain forwards of both models over the rolled-out batch
    m = a.labels[:, 1:] != -100
    with torch.no_grad():
        y = a.labels[:, 1:][m]
        s_lp = torch.log_softmax(student(a.input_ids, attention_mask=a.attention_mask).logits[:, :-1][m][:, :vocab], -1)
        t_lp = torch.log_softmax(teacher(a.input_ids, attention_mask=a.attention_mask).logits[:, :-1][m][:, :vocab], -1)
    s_lp, t_lp = s_lp.gather(-1, y[:, None]).squeeze(-1), t_lp.gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(a.policy.old_logprob, s_lp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.policy.weight, importance_weight(s_lp, t_lp, 0.2), rtol=1e-4, atol=1e-5)
    n = m.sum(1)
    resp = torch.arange(int(n.max()))[None, :] < n[:, None]
    spread = lambda v: torch.zeros(resp.shape).masked_scatter(resp, v)  # noqa: E731
    want = advantages(rewards(spread(t_lp), spread(s_lp), resp, 0.5, 100.0), resp, 0.95, "count", True)[resp]
    torch.testing.assert_close(a.policy.advantage, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.teacher_selected[:, :vocab].log_softmax(-1).gather(-1, y[:, None]).squeeze(-1), t_lp,
                               rtol=1e-4, atol=1e-5)


def test_minillm_preset_trains_and_validates(tmp_path):
    from switchkd.config import ConfigError

    cfg = load_config(ROOT / "configs/tiny/minillm.yaml", [f"output.dir={tmp_path}", "train.max_steps=3", "data.synthetic_size=48",
                                                           "eval.limit=4", "eval.max_new_tokens=8", "method.max_new_tokens=16",
                                                           "train.loss_chunk=7"])
    assert_learns(cfg)  # the dev objective falls
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "minillm/reward" in lines[0] and '"dev_rougeL"' in lines[-1]
    assert MethodConfig().minillm.teacher_mix == 0.2
    for bad, key in [("method.minillm.clip=2", "method.minillm.clip"), ("method.minillm.length_norm=x", "length_norm"),
                     ("method.minillm.ppo_epochs=0", "ppo_epochs"), ("method.priming=teacher", "priming")]:
        with pytest.raises(ConfigError, match=key):
            load_config(ROOT / "configs/tiny/minillm.yaml", [bad])


def test_grad_accum_holds_distinct_rollouts_per_step_and_ppo_moves_the_ratio(tmp_path):
    """LMOps: a PPO batch is chunk_size x grad_accum fresh samples, trained ppo_epochs times; the
    importance ratio q_new / q_old leaves 1 after the first update; no dropout while training."""
    from switchkd.train import Trainer

    cfg = load_config(ROOT / "configs/tiny/minillm.yaml", [
        f"output.dir={tmp_path}", "train.max_steps=3", "train.grad_accum=2", "train.batch_size=2",
        "method.minillm.ppo_epochs=2", "data.synthetic_size=48", "method.max_new_tokens=10", "data.dev=null",
        "train.lr=1e-2", "train.scheduler=constant", "train.warmup_steps=0"])
    tr = Trainer(cfg)
    seen, draws = [], []
    step_batches = tr.source.step_batches

    def spy(batches, step, n):
        def counted():
            while True:
                draws.append(step)
                yield next(batches)
        group = step_batches(counted(), step, n)
        assert tr.student.training is False or not tr.source.dropout
        seen.append([(b.input_ids.clone(), b.policy.old_logprob.clone()) for b in group])
        if step == 1:  # before the second update of the held rollouts: the first update moved the policy
            model = tr.acc.unwrap_model(tr.student).eval()
            with torch.no_grad():
                for b in group:
                    m = b.labels[:, 1:] != -100
                    lp = torch.log_softmax(model(b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][m]
                                           .float(), -1).gather(-1, b.labels[:, 1:][m][:, None]).squeeze(-1)
                    ratio = torch.exp(lp - b.policy.old_logprob)
                    assert (ratio - 1).abs().max() > 1e-3
        return group

    tr.source.step_batches = spy
    tr.fit()
    assert draws == [0, 0, 2, 2]  # step 1 reuses step 0's two rollouts; nothing drawn and thrown away
    (a0, _), (a1, _) = seen[0]
    assert not torch.equal(a0, a1) or a0.shape != a1.shape  # two distinct rollouts in one optimizer step
    for (x, lx), (y, ly) in zip(seen[0], seen[1]):
        assert torch.equal(x, y) and torch.equal(lx, ly)  # trained a second time (ppo_epochs = 2)
    assert tr.source.dropout is False and tr.student.training is False


def test_gkd_preset_follows_trl_loss_temperature_and_dropout():
    """TRL's GKDTrainer samples at temperature 0.9 but computes generalized_jsd_loss at its default
    temperature 1, and disable_dropout turns dropout off for generation and training."""
    import inspect

    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    from switchkd.methods import SOURCES

    cfg = load_config(ROOT / "configs/tiny/gkd.yaml", [])
    assert cfg.method.decoding.temperature == 0.9
    assert cfg.method.temperature == inspect.signature(GKDTrainer.generalized_jsd_loss).parameters["temperature"].default
    assert SOURCES["mixture"].dropout is False and SOURCES["dataset"].dropout is True


def test_source_whitens_over_the_fixed_generation_block_as_lmops():
    """LMOps pads every generation to its fixed length and whitens the advantages over that whole
    [B, R] block (zeros included); the source does the same with R = min(method.max_new_tokens,
    data.max_length - data.max_prompt_length), not over the longest response of the batch."""
    from switchkd.batch import Batch
    from switchkd.methods import make_source

    cfg = load_config(ROOT / "configs/tiny/minillm.yaml", ["method.max_new_tokens=9", "data.max_length=200",
                                                          "data.max_prompt_length=100"])
    src = make_source(cfg, None, None, type("Tok", (), {"pad_token_id": 0})(), V)
    lengths = [4, 2, 3]  # every row shorter than the block R = 9
    batch = Batch.build([[1, 2], [3], [4, 5, 6]], [[7] * n for n in lengths], 0, [0, 1, 2])
    g = torch.Generator().manual_seed(0)
    N = sum(lengths)  # predicted response tokens (every response token follows a prompt token)
    batch.teacher_selected = torch.randn(N, V, generator=g)
    s_lp = -torch.rand(N, generator=g) * 3
    got = src.policy(batch, s_lp)
    n = (batch.labels[:, 1:] != -100).sum(1)
    R = 9
    mask = torch.arange(R)[None, :] < n[:, None]
    y = batch.labels[:, 1:][batch.labels[:, 1:] != -100]
    t_lp = torch.log_softmax(batch.teacher_selected, -1).gather(-1, y[:, None]).squeeze(-1)
    spread = lambda v: torch.zeros(mask.shape).masked_scatter(mask, v)  # noqa: E731
    want_r, _ = lmops_rewards_and_weight(spread(t_lp), spread(s_lp), mask, 0.2, 0.5, 100.0)
    want = lmops_get_advantages_and_returns(want_r, R, mask, 0.95)[mask]
    torch.testing.assert_close(got.advantage, want.float(), rtol=1e-5, atol=1e-5)
    narrow = mask[:, : int(n.max())]  # whitening over the longest response only gives other values
    other = lmops_get_advantages_and_returns(want_r[:, : narrow.shape[1]], narrow.shape[1], narrow, 0.95)[narrow]
    assert (other.float() - want.float()).abs().max() > 0.05
    assert got.clip == cfg.method.minillm.clip


@pytest.mark.parametrize("family", ["tiny", "gpt2-xl_to_gpt2", "smollm2"])
def test_minillm_presets_use_lmops_adamw(family):
    cfg = load_config(ROOT / f"configs/{family}/minillm.yaml")
    assert list(cfg.train.betas) == [0.9, 0.95] and cfg.train.weight_decay == 1e-6
