"""SKD (Xu et al., ICLR 2025): the rule by recomputation in both decoders, and the preset trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_spec import spec
from learning import assert_learns

from switchkd.config import ModelConfig, load_config
from switchkd.data import left_pad
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import rollout

ROOT = Path(__file__).resolve().parents[1]


def _pair():
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    student = load_model(ModelConfig(name="tiny:llama,layers=2,dim=32,heads=4,kv_heads=2,seed=3"), tok, trainable=False)
    teacher = load_model(ModelConfig(name="tiny:llama,layers=3,dim=48,heads=4,kv_heads=2,seed=4"), tok, trainable=False)
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in ("Q: hi\nA: ", "a longer one?", "x")],
                         tok.pad_token_id)
    return student, teacher, tok, ids, mask


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_skd_rule_confirmed_by_recomputation(speculative, k):
    """Every token is the student's where it lies in the teacher's top K at that prefix, else the teacher's."""
    student, teacher, tok, ids, mask = _pair()
    cfg = spec(source="switch", gate="rank", schedule="const", tau0=k - 0.5, max_new_tokens=20, do_sample=True,
                        seed=7, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                        speculative=speculative)
    out = rollout(student, teacher, ids, mask, *cfg)
    P, V = ids.shape[1], len(tok)
    full_mask = torch.cat([mask, out.response_mask.long()], 1)
    with torch.no_grad():
        p = teacher(out.sequences, attention_mask=full_mask).logits[:, P - 1:-1, :V]  # before each response token
    y = out.sequences[:, P:]
    in_top_k = (p > p.gather(-1, y[..., None])).sum(-1) < k  # rank of the token under the teacher
    m = out.response_mask
    student_written = ~out.from_teacher
    # a student token is always in the teacher's top K, and its logged rank is the recomputed one; where the
    # teacher wrote, the logged gate is the rejected proposal's rank, outside the top K
    assert bool(in_top_k[m & student_written].all())
    rank = (p > p.gather(-1, y[..., None])).sum(-1).double()
    torch.testing.assert_close(out.gate[m & student_written].double(), rank[m & student_written])
    assert bool((out.gate[m & out.from_teacher] >= k).all())
    assert torch.equal(out.from_teacher[m], (out.gate > k - 0.5)[m])
    if k == 1:
        assert int(out.from_teacher[m].sum()) > 0  # a random student often misses the teacher's argmax


def test_skd_preset_trains_and_logs(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/skd.yaml", [f"output.dir={tmp_path}", "train.max_steps=3", "data.synthetic_size=24",
                                                        "train.batch_size=4", "eval.limit=2", "eval.max_new_tokens=4",
                                                        "method.max_new_tokens=12", "train.log_every=1", "method.skd.top_k=3"])
    assert cfg.method.source == "skd" and load_config(ROOT / "configs/tiny/skd.yaml").method.skd.top_k == 25
    assert_learns(cfg)  # the dev objective falls
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["skd/teacher_frac"] <= 1.0 for r in rows) and any(k.startswith("skd/gate@") for k in rows[-1])
    with pytest.raises(Exception, match="method.skd.top_k"):
        load_config(ROOT / "configs/tiny/skd.yaml", ["method.skd.top_k=0"])


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``[..., V]`` bool: the tokens of the teacher's sampling nucleus, recomputed in float64 (the smallest set of the
    most probable tokens, at ``temperature``, whose mass reaches ``top_p``: a token is in it when the mass of the
    tokens before it, in decreasing order, is below ``top_p``)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    ordered, order = probs.sort(-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    keep = torch.zeros_like(probs, dtype=torch.bool)
    return keep.scatter(-1, order, before < top_p)


@pytest.mark.parametrize("speculative", [False, True])
def test_skd_authors_rule_under_the_teachers_warped_distribution(speculative):
    """The authors' settings (speculative_kd's _speculative_kd_sampling after the teacher's temperature 0.2 / top-p 0.5
    warpers): a student token stands only where it is in the teacher's nucleus and among its K most probable tokens;
    every teacher token is a sample of the warped distribution, so it lies in the nucleus."""
    from switchkd.rollout import RolloutConfig
    from switchkd.rules import Rank

    student, teacher, tok, ids, mask = _pair()
    k, temperature, top_p = 5, 0.2, 0.5
    cfg = RolloutConfig(max_new_tokens=24, do_sample=True, temperature=0.5, top_p=0.5, seed=11,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                        speculative=speculative)
    out = rollout(student, teacher, ids, mask, cfg, Rank(top_k=k, temperature=temperature, top_p=top_p))
    P, V = ids.shape[1], len(tok)
    full_mask = torch.cat([mask, out.response_mask.long()], 1)
    with torch.no_grad():
        p = teacher(out.sequences, attention_mask=full_mask).logits[:, P - 1:-1, :V]
    y = out.sequences[:, P:]
    nucleus = _nucleus(p, temperature, top_p)
    in_nucleus = nucleus.gather(-1, y[..., None]).squeeze(-1)
    rank = (p > p.gather(-1, y[..., None])).sum(-1)  # (temperature keeps the order)
    m, by_teacher = out.response_mask, out.from_teacher
    assert bool((in_nucleus & (rank < k))[m & ~by_teacher].all())
    assert bool(in_nucleus[m & by_teacher].all())
    assert int((m & by_teacher).sum()) > 0 and int((m & ~by_teacher).sum()) > 0


def test_skip_first_token_drops_each_responses_first_prediction_and_its_teacher_row():
    from switchkd.batch import Batch
    from switchkd.methods.skd import without_first_token

    prompts, responses = [[5, 6, 7], [8], [9, 10]], [[11, 12, 13], [14, 15], [16]]
    batch = Batch.build(prompts, responses, 0, [0, 1, 2])
    n = sum(len(r) for r in responses)
    batch.teacher_selected = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 4).clone()
    out = without_first_token(batch)
    assert out.responses() == [r[1:] for r in responses]
    firsts = {0, 3, 5}  # each row's first response token in the kept logits' row-major order
    assert out.teacher_selected[:, 0].tolist() == [float(i) for i in range(n) if i not in firsts]


def test_skd_authors_settings_are_refused_where_the_rule_cannot_run():
    from switchkd.config import ConfigError

    with pytest.raises(ConfigError, match="authors' settings"):
        load_config(ROOT / "configs/tiny/skd.yaml", ["method.decoding.engine=vllm"])
    paper = ["method.skd.teacher_temperature=1", "method.skd.teacher_top_p=1", "method.skd.skip_first_token=false"]
    assert load_config(ROOT / "configs/tiny/skd.yaml", paper + ["method.decoding.engine=vllm"]).method.skd.top_k == 25
