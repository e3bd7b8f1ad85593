"""CUDA-only checks (marker ``gpu``; skipped without a GPU): every tiny preset trains on CUDA in float32
and in bf16, and the compiled static-cache engine agrees with the eager one there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from switchkd.config import load_config
from switchkd.train import train

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs/tiny").glob("*.yaml"))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_cuda(preset, precision, tmp_path):
    bf16 = precision == "bf16"
    over = [f"output.dir={tmp_path}", "train.max_steps=3", "data.synthetic_size=48", "eval.limit=4",
            "eval.max_new_tokens=8", "method.max_new_tokens=32", "train.eval_every=0", "train.log_every=1"]
    if bf16:
        over += ["train.mixed_precision=bf16", "model.dtype=bfloat16"]
        over += ["teacher.dtype=bfloat16"] if load_config(ROOT / f"configs/tiny/{preset}.yaml").teacher else []
    final = train(load_config(ROOT / f"configs/tiny/{preset}.yaml", over))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (final / "model.safetensors").is_file() and all(map(lambda v: v == v and abs(v) < 1e6, losses))


def test_compiled_engine_on_cuda_equals_eager():
    from switchkd.config import ModelConfig
    from switchkd.data import left_pad
    from switchkd.models import load_model, load_tokenizer
    from switchkd.rollout import Gate, RolloutConfig, rollout

    tok = load_tokenizer(ModelConfig(name="tiny:llama"))
    s = load_model(ModelConfig(name="tiny:llama,layers=2,dim=64,heads=4,kv_heads=2,seed=3"), tok, trainable=False).cuda()
    t = load_model(ModelConfig(name="tiny:llama,layers=3,dim=96,heads=4,kv_heads=2,seed=4"), tok, trainable=False).cuda()
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in ["Q: hi\nA: ", "Q: longer one?\nA: "]],
                         tok.pad_token_id)
    ids, mask = ids.cuda(), mask.cuda()
    cfg, gate = dict(max_new_tokens=32, do_sample=False, speculative=False), Gate(tau0=0.05)
    eager = rollout(s, t, ids, mask, RolloutConfig(**cfg, compile=False), gate)
    compiled = rollout(s, t, ids, mask, RolloutConfig(**cfg, compile=True), gate)
    assert torch.equal(eager.sequences, compiled.sequences)
    spec = rollout(s, t, ids, mask, RolloutConfig(**(cfg | {"speculative": True})), gate)
    assert torch.equal(eager.sequences, spec.sequences)
