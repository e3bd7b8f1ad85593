"""``switchkd prune`` (:mod:`switchkd.prune`): Minitron importance against a float64 recomputation, pruning that keeps
everything is the identity, planted dead units are the ones removed with the logits unchanged, GQA / tied embeddings
/ ``head_dim`` on a tiny Llama with 3 key/value heads, Qwen2 biases, GPT-2, and every bad request in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from switchkd.cli import main
from switchkd.config import ModelConfig
from switchkd.models import load_tokenizer
from switchkd.prune import Importance, Shape, importance, prune_model, sizes_of

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="tiny:gpt2"))


def llama(tok, seed: int = 0, **kw) -> LlamaForCausalLM:
    """A tiny Llama: hidden 48, 6 query heads in 3 key/value groups, head_dim 8, MLP 64, 4 blocks, tied."""
    cfg = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=3, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2) | kw
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def gpt2(tok) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_inner=80,
                                      n_positions=256, initializer_range=0.2)).eval()


def sequences(tok, n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, len(tok), (int(torch.randint(5, 20, (), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_keeping_every_unit_is_the_identity(tok):
    ids = [sequences(tok, 1)[0]]
    for model in (llama(tok), gpt2(tok), Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)).eval()):
        imp = importance(model, sequences(tok), tok.pad_token_id, batch_size=4)
        same = prune_model(model, imp, Shape())
        torch.testing.assert_close(logits(same, ids), logits(model, ids), rtol=0, atol=1e-6)


def _recomputed(model, seqs):
    """Importance in float64 from each example alone (no padding), by the formulas of the module docstring."""
    s = sizes_of(model.config)
    acts = {}

    def keep(name):
        return lambda m, a, out=None: acts.setdefault(name, []).append(
            (a[0] if out is None else (out[0] if isinstance(out, tuple) else out)).detach().double()[0])

    handles = []
    for i, block in enumerate(model.model.layers):
        handles += [block.input_layernorm.register_forward_hook(keep(f"n{i}a")),
                    block.post_attention_layernorm.register_forward_hook(keep(f"n{i}b")),
                    block.mlp.down_proj.register_forward_pre_hook(keep(f"d{i}")),
                    block.self_attn.o_proj.register_forward_pre_hook(keep(f"o{i}")),
                    block.register_forward_pre_hook(keep(f"in{i}")), block.register_forward_hook(keep(f"out{i}"))]
    with torch.no_grad():
        for seq in seqs:
            model(torch.tensor([seq]))
    for h in handles:
        h.remove()

    def l2_of_means(name):
        return torch.stack([a.abs().mean(0) for a in acts[name]]).pow(2).sum(0).sqrt()

    L = s.layers
    hidden = sum(l2_of_means(f"n{i}{x}") for i in range(L) for x in "ab")
    mlp = torch.stack([l2_of_means(f"d{i}") for i in range(L)])
    heads = torch.stack([l2_of_means(f"o{i}").view(s.heads, s.head_dim).pow(2).sum(-1).sqrt() for i in range(L)])
    blocks = []
    for i in range(L):
        cos = torch.cat([torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in zip(acts[f"in{i}"], acts[f"out{i}"])])
        blocks.append((1 - cos).mean())
    return hidden, mlp, heads, torch.stack(blocks)


def test_importance_equals_a_float64_recomputation(tok):
    """Padded batches (masked) against one example at a time, float64 throughout."""
    model = llama(tok).double()
    seqs = sequences(tok, 7)
    imp = importance(model, seqs, tok.pad_token_id, batch_size=3)
    hidden, mlp, heads, blocks = _recomputed(model, seqs)
    for got, want in ((imp.hidden, hidden), (imp.mlp, mlp), (imp.heads, heads), (imp.blocks, blocks)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert imp.examples == 7


def _plant(model, dead_hidden, dead_neurons, dead_heads):
    """Hidden channels that carry nothing (embedding columns and every write to the residual stream zeroed), MLP
    neurons whose down_proj input is 0 (their up_proj rows zeroed), query heads whose output is never read (their
    o_proj columns zeroed)."""
    hd = model.config.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead_hidden] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[dead_hidden, :] = 0
            block.mlp.down_proj.weight[dead_hidden, :] = 0
            block.mlp.up_proj.weight[dead_neurons, :] = 0
            for h in dead_heads:
                block.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


def test_planted_dead_units_are_the_ones_removed_and_the_logits_do_not_change(tok):
    model = llama(tok, seed=2)
    dead_hidden, dead_neurons, dead_heads = [3, 17, 40], list(range(0, 64, 4)), [1, 2, 5]  # one head per group
    _plant(model, dead_hidden, dead_neurons, dead_heads)
    imp = importance(model, sequences(tok), tok.pad_token_id, batch_size=4)
    assert set(imp.hidden.argsort()[:3].tolist()) == set(dead_hidden)
    assert all(set(row.argsort()[:16].tolist()) == set(dead_neurons) for row in imp.mlp)
    assert float(imp.hidden[dead_hidden].max()) == 0.0 and float(imp.mlp[:, dead_neurons].max()) == 0.0
    # a head's o_proj input is its attention over its group's values, never zero while the group lives: the heads
    # whose output is never read are marked least important here (the rest of the plan is the measured one)
    heads = imp.heads.clone()
    heads[:, dead_heads] = -1.0
    imp = Importance(imp.hidden, imp.mlp, heads, imp.blocks, imp.examples)
    small = prune_model(model, imp, Shape(hidden=45, mlp=48, heads_per_group=1))
    assert small.config.hidden_size == 45 and small.config.intermediate_size == 48
    assert small.config.num_attention_heads == 3 and small.config.num_key_value_heads == 3
    ids = sequences(tok, 3)
    for seq in ids:
        torch.testing.assert_close(logits(small, [seq]), logits(model, [seq]), rtol=1e-4, atol=1e-4)
    kept_q = small.model.layers[0].self_attn.q_proj.weight
    keep_rows = [r for h in range(6) if h not in dead_heads for r in range(h * 8, h * 8 + 8)]
    keep_cols = [c for c in range(48) if c not in dead_hidden]
    torch.testing.assert_close(kept_q, model.model.layers[0].self_attn.q_proj.weight[keep_rows][:, keep_cols]
                               * 1.0, rtol=0, atol=0)


def test_gqa_tied_embeddings_and_head_dim_survive_a_save(tok, tmp_path):
    model = llama(tok)
    imp = importance(model, sequences(tok), tok.pad_token_id)
    small = prune_model(model, imp, Shape(hidden=42, mlp=32, heads_per_group=1, layers=3))
    small.save_pretrained(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["num_hidden_layers"]) == (42, 32, 3, 3, 8, 3)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert again.model.layers[0].self_attn.q_proj.weight.shape == (24, 42)
    ids = [sequences(tok, 1)[0]]
    torch.testing.assert_close(logits(again, ids), logits(small, ids), rtol=0, atol=1e-6)
    kept = sorted(imp.blocks.argsort(descending=True)[:3].tolist())  # the blocks with the highest influence
    torch.testing.assert_close(small.model.layers[2].mlp.down_proj.weight,
                               model.model.layers[kept[2]].mlp.down_proj.weight[
                                   torch.sort(torch.argsort(-imp.hidden, stable=True)[:42]).values][
                                   :, torch.sort(torch.argsort(-imp.mlp[kept[2]], stable=True)[:32]).values])


def test_gpt2_mlp_and_depth(tok):
    model = gpt2(tok)
    imp = importance(model, sequences(tok), tok.pad_token_id)
    small = prune_model(model, imp, Shape(mlp=40, layers=2))
    assert small.config.n_inner == 40 and small.config.n_layer == 2
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (32, 40)
    assert torch.isfinite(logits(small, [sequences(tok, 1)[0]])).all()


def _teacher_dir(tmp_path: Path, tok, model=None) -> Path:
    out = tmp_path / "teacher"
    (model or llama(tok)).save_pretrained(out)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


def _data(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i} things.", "input": "", "output": f"{i} things " * 3})
                            + "\n" for i in range(n)))
    return path


def test_prune_cli_writes_a_loadable_student(tok, tmp_path, capsys):
    teacher = _teacher_dir(tmp_path, tok)
    assert main(["prune", str(teacher), str(tmp_path / "s"), "--hidden", "42", "--mlp", "48", "--heads-per-group",
                 "1", "--layers", "3", "--data", str(_data(tmp_path)), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "parameters (teacher" in out and "importance from 8 examples" in out
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.hidden_size == 42 and student.config.num_hidden_layers == 3
    assert "<|assistant|>" in (json.loads((tmp_path / "s" / "tokenizer_config.json").read_text()).get("chat_template")
                               or (tmp_path / "s" / "chat_template.jinja").read_text())


@pytest.mark.parametrize("flags, expected", [
    (["--mlp", "65"], "--mlp 65: expected 1..64"),
    (["--hidden", "49"], "--hidden 49: expected 1..48"),
    (["--heads-per-group", "3"], "--heads-per-group 3: expected 1..2"),
    (["--layers", "5"], "--layers 5: expected 1..4"),
    (["--hidden", "40", "--heads-per-group", "1"], "multiple of the query heads (e.g. 39 or 42)"),
])
def test_bad_sizes_are_one_line_before_the_weights_load(tok, tmp_path, capsys, flags, expected):
    teacher = _teacher_dir(tmp_path, tok)
    (teacher / "model.safetensors").write_bytes(b"not loaded")  # the check comes first
    assert main(["prune", str(teacher), str(tmp_path / "s"), *flags, "--data", str(_data(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchkd: error: prune: ") and expected in err[0], err
    assert not (tmp_path / "s").exists()


def test_bad_requests_are_one_line_and_write_nothing(tok, tmp_path, capsys):
    teacher = _teacher_dir(tmp_path, tok)
    data = _data(tmp_path)
    gpt = tmp_path / "gpt2"
    gpt2(tok).save_pretrained(gpt)
    tok.save_pretrained(gpt)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe{not json")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("keep")
    cases = [
        ([str(gpt), "--hidden", "16"], "GPT-2 takes --mlp and --layers only"),
        ([str(other), "--mlp", "4"], "model_type 'bert' is not supported"),
        ([str(teacher), "--mlp", "8", "--data", str(empty)], str(empty)),
        ([str(teacher), "--mlp", "8", "--data", str(garbage)], str(garbage)),
        ([str(teacher), "--mlp", "8", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([str(tmp_path / "nowhere"), "--mlp", "8"], "nowhere"),
    ]
    for args, expected in cases:
        if "--data" not in args:
            args = [*args, "--data", str(data)]
        assert main(["prune", args[0], str(tmp_path / "s"), *args[1:]]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("switchkd: error: ") and expected in err[0], (args, err)
        assert not (tmp_path / "s").exists()
    assert main(["prune", str(teacher), str(existing), "--mlp", "8", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(existing) in err[0] and (existing / "x").read_text() == "keep", err


def test_parameter_count_is_the_built_models(tok):
    from switchkd.prune import check_shape, parameters
    from switchkd.prune_shapes import parameter_count

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    for model, shape in ((llama(tok), Shape(hidden=42, mlp=40, heads_per_group=1, layers=3)),
                         (llama(tok, tie_word_embeddings=False), Shape(mlp=24)), (qwen, Shape(hidden=24, mlp=16)),
                         (gpt2(tok), Shape(mlp=40, layers=2))):
        sizes = sizes_of(model.config)
        imp = importance(model, sequences(tok, 3), tok.pad_token_id)
        small = prune_model(model, imp, shape)
        assert parameter_count(sizes, check_shape(shape, sizes), model.config) == parameters(small)
        assert parameter_count(sizes, check_shape(Shape(), sizes), model.config) == parameters(model)


def test_params_picks_a_shape_near_the_budget_by_held_out_cross_entropy(tok, tmp_path, capsys):
    from switchkd.prune import parameters
    from switchkd.prune_shapes import shapes_near

    model = llama(tok)
    target = parameters(model) * 2 // 3
    shapes = shapes_near(sizes_of(model.config), model.config, target)
    assert len(shapes) > 1
    teacher = _teacher_dir(tmp_path, tok, model)
    assert main(["prune", str(teacher), str(tmp_path / "s"), "--params", str(target), "--data", str(_data(tmp_path, 24)),
                 "--samples", "12"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "held-out CE" in x]
    assert len(lines) == len(shapes)
    best = min(lines, key=lambda x: float(x.rsplit(" ", 1)[1]))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    c = student.config
    assert best.strip().startswith(f"hidden {c.hidden_size}, MLP {c.intermediate_size}, "
                                   f"{c.num_attention_heads // 3} heads per group, {c.num_hidden_layers} blocks")
    assert abs(parameters(student) - target) <= 0.05 * target


@pytest.mark.parametrize("flags, expected", [
    (["--params", "1000", "--mlp", "8"], "not both"),
    ([], "not both"),
    (["--params", "12"], "--params 12: no shape of the grid within 5%"),
])
def test_params_requests_are_one_line(tok, tmp_path, capsys, flags, expected):
    teacher = _teacher_dir(tmp_path, tok)
    assert main(["prune", str(teacher), str(tmp_path / "s"), *flags, "--data", str(_data(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "s").exists()


def test_shrink_with_data_keeps_the_blocks_of_highest_block_influence(tok, tmp_path, capsys):
    from switchkd.prune import calibration_sequences

    model = llama(tok, seed=3)
    with torch.no_grad():  # block 2 writes nothing to the residual stream: influence 0, never kept
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    teacher = _teacher_dir(tmp_path, tok, model)
    data = _data(tmp_path)
    assert main(["shrink", str(teacher), str(tmp_path / "s"), "--layers", "3", "--data", str(data), "--samples", "8"]) == 0
    imp = importance(model, calibration_sequences(str(data), tok, 8, 512), tok.pad_token_id)
    assert float(imp.blocks[2]) < 1e-9
    want = sorted(imp.blocks.argsort(descending=True)[:3].tolist())
    assert 2 not in want and f"kept decoder blocks {','.join(map(str, want))} (highest Block Influence)" in capsys.readouterr().out
    assert main(["shrink", str(teacher), str(tmp_path / "t"), "--keep", "0,1", "--data", str(data)]) == 2
    assert "give one" in capsys.readouterr().err
