"""The training loop: split-invariant gradients, presets run, exact resume (2-process DDP: tests/test_launch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from learning import assert_learns
from safetensors.torch import load_file

from switchkd.config import load_config
from switchkd.data import collate, load_examples, tokenize
from switchkd.losses import response_logits, shifted
from switchkd.models import load_pair
from switchkd.train import step_gradients, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:llama,layers=1,dim=32,heads=4,seed=7",
        "data.synthetic_size=64", "data.max_prompt_length=128", "data.max_length=320", "train.log_every=1",
        "eval.limit=4", "eval.max_prompt_length=128", "eval.max_length=200", "eval.max_new_tokens=8"]


def cpu_accelerator() -> Accelerator:
    """A CPU Accelerator even where an earlier test's Trainer initialised accelerate on CUDA."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True)


def _grads(cfg, groups):
    student, teacher, tok, vocab = load_pair(cfg.model, cfg.teacher)
    acc = cpu_accelerator()
    loss, n = step_gradients(student, teacher, groups(tok), cfg, vocab, acc)
    return loss, n, {k: p.grad.clone() for k, p in student.named_parameters()}


@pytest.mark.parametrize("method", [["method.name=sft", "method.kd_ratio=0"], ["method.name=kd", "method.divergence=fkl", "method.kd_ratio=0.5"],
                                    ["method.name=bild", "method.divergence=bild", "method.temperature=3"]])
def test_one_batch_of_four_equals_four_of_one(method):
    cfg = load_config(None, TINY + method)

    def items(tok):
        return tokenize(load_examples("synthetic", cfg.data, tok)[:4], tok, 128, 320)[0]

    l1, n1, g1 = _grads(cfg, lambda tok: [collate(items(tok), tok.pad_token_id)])
    l4, n4, g4 = _grads(cfg, lambda tok: [collate([x], tok.pad_token_id) for x in items(tok)])
    assert n1 == n4 > 0 and abs(l1 - l4) < 1e-5
    assert len({len(x.response) for x in items(load_pair(cfg.model, None)[2])}) > 1  # unequal lengths matter
    for k in g1:
        torch.testing.assert_close(g1[k], g4[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["sft", "kd", "bild"])
def test_tiny_presets_train(preset, tmp_path):
    cfg = load_config(ROOT / f"configs/tiny/{preset}.yaml",
                      [f"output.dir={tmp_path}", "train.max_steps=3", "data.synthetic_size=48", "eval.limit=4",
                       "eval.max_new_tokens=8"])
    final = assert_learns(cfg)  # the dev objective falls
    assert (final / "model.safetensors").is_file() and (tmp_path / "config.yaml").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"dev_rougeL"' in lines[-1] and all(torch.isfinite(torch.tensor(eval(x.replace("null", "None"))["loss"]))
                                               for x in lines)


def test_resume_continues_exactly(tmp_path):
    """A run checkpointed at step 3 and resumed from there ends with the same weights as one run."""
    base = TINY + ["method.name=kd", "method.divergence=fkl", "train.max_steps=6", "train.batch_size=4", "data.dev=null", "train.save_every=3",
                   f"output.dir={tmp_path}"]
    full = load_file(train(load_config(None, base)) / "model.safetensors")
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]
    resumed = load_file(train(load_config(None, base + ["train.resume=true"])) / "model.safetensors")
    for k in full:
        torch.testing.assert_close(full[k], resumed[k], rtol=0, atol=1e-6)
    steps = [eval(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: the resumed run drops the lines after its checkpoint


@pytest.mark.parametrize("method", [["method.name=sft", "method.kd_ratio=0"],
                                    ["method.name=kd", "method.kd_ratio=0.7", "method.divergence=srkl"],
                                    ["method.name=bild", "method.divergence=bild", "method.temperature=3"],
                                    ["method.name=kd", "method.divergence=fkl", "method.priming=confidence"]])
def test_chunked_loss_equals_full_loss_and_gradients(method):
    cfg = load_config(None, TINY + method)

    def groups(tok):
        ex = load_examples("synthetic", cfg.data, tok)[:4]
        return [collate(tokenize(ex, tok, 128, 320, cfg.method.priming)[0], tok.pad_token_id)]

    full = _grads(cfg, groups)
    cfg.train.loss_chunk = 7  # odd size: chunks straddle rows
    chunked = _grads(cfg, groups)
    assert abs(full[0] - chunked[0]) < 1e-5 and full[1] == chunked[1]
    for k in full[2]:
        torch.testing.assert_close(full[2][k], chunked[2][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["tiny:gpt2,layers=1,dim=32,heads=2", "tiny:llama,layers=1,dim=32,heads=4,seed=7"])
def test_response_logits_equal_the_full_forward(spec):
    cfg = load_config(None, TINY + [f"model.name={spec}"])
    model, _, tok, vocab = load_pair(cfg.model, None)
    ex = load_examples("synthetic", cfg.data, tok)[:5]
    b = collate(tokenize(ex, tok, 128, 320)[0], tok.pad_token_id)
    assert (b.labels[:, 1:] != -100).any(0).nonzero()[0] > 1  # the prompt part really is skipped
    full = shifted(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels, vocab)
    kept = response_logits(model, b.input_ids, b.attention_mask, b.labels, vocab)
    torch.testing.assert_close(kept[0], full[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(kept[1], full[1])
