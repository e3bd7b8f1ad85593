"""LoRA students through peft, LoRA-tuned teachers, gradient checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from switchkd.config import ConfigError, ModelConfig, load_config
from switchkd.models import load_model, load_pair, load_tokenizer
from switchkd.train import train

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny:gpt2,layers=1,dim=32,heads=2,seed=5", "teacher.name=tiny:llama,layers=1,dim=32,heads=4,seed=7",
        "data.synthetic_size=32", "data.dev=null", "train.max_steps=3", "train.log_every=1", "train.lr=1e-2",
        "train.keep_best=false"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("preset", ["kd", "switch"])
def test_lora_trains_saves_reloads_and_merges_to_the_same_logits(preset, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(ROOT / f"configs/tiny/{preset}.yaml", TINY + ["model.lora.r=4", "output.merge=true",
                                                                     f"output.dir={out}"])
    final = train(cfg)
    assert (final / "adapter/adapter_config.json").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model.name
    tok = load_tokenizer(ModelConfig(name=str(final)))
    ids = torch.tensor([tok("Q: 12+7\nA: ", add_special_tokens=False)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()  # plain transformers
    from_adapter = load_model(ModelConfig(name=str(final / "adapter")), tok, trainable=False)  # base + adapter
    as_teacher = load_model(ModelConfig(name=cfg.model.name, adapter=str(final / "adapter")), tok, trainable=False)
    base = load_model(ModelConfig(name=cfg.model.name), tok, trainable=False)
    torch.testing.assert_close(_logits(from_adapter, ids), _logits(merged, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(as_teacher, ids), _logits(merged, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(base, ids), _logits(merged, ids), atol=1e-4)  # the adapter learned something
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_only_the_adapter_trains():
    cfg = load_config(None, TINY + ["model.lora.r=2", "model.lora.target_modules=[c_attn]"])
    student, *_ = load_pair(cfg.model, None)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "c_attn" in n for n in trainable)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_config(None, ["model.lora.r=-1"])
    with pytest.raises(ConfigError, match="teacher.adapter"):
        load_config(None, TINY + ["teacher.lora.r=4"])
    with pytest.raises(ConfigError, match="output.merge"):
        load_config(None, ["output.merge=true"])


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    runs = {}
    for gc in (False, True):
        cfg = load_config(ROOT / "configs/tiny/kd.yaml", TINY + [f"train.gradient_checkpointing={gc}",
                                                                f"output.dir={tmp_path / str(gc)}"])
        train(cfg)
        runs[gc] = [json.loads(x)["loss"] for x in (tmp_path / str(gc) / "metrics.jsonl").read_text().splitlines()]
    assert runs[False] == pytest.approx(runs[True], rel=1e-5)
