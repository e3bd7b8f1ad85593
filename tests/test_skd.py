"""SKD (Xu et al., ICLR 2025): the rule by recomputation in both decoders, and the preset trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_spec import spec

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
    from switchkd.train import train

    cfg = load_config(ROOT / "configs/tiny/skd.yaml", [f"output.dir={tmp_path}", "train.max_steps=3", "data.synthetic_size=24",
                                                        "train.batch_size=4", "eval.limit=2", "eval.max_new_tokens=4",
                                                        "method.max_new_tokens=12", "train.log_every=1", "method.skd.top_k=3"])
    assert cfg.method.source == "skd" and load_config(ROOT / "configs/tiny/skd.yaml").method.skd.top_k == 25
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["skd/teacher_frac"] <= 1.0 for r in rows) and any(k.startswith("skd/gate@") for k in rows[-1])
    with pytest.raises(Exception, match="method.skd.top_k"):
        load_config(ROOT / "configs/tiny/skd.yaml", ["method.skd.top_k=0"])
