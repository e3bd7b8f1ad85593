"""CRISPR: attribution vs finite differences, option scoring vs a manual sum, exact prune/restore,
a planted bias neuron that must rank first, encoder-decoder support, and the CLI on stored BBQ data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from switchkd.bbq import INSTRUCTIONS, Item, prompt, read_bbq
from switchkd.cli import main
from switchkd.config import ConfigError, ModelConfig
from switchkd.crispr import (
    Pruner,
    _pair_batch,
    accuracy,
    attribution,
    bias_scores,
    capture,
    neuron_modules,
    option_logprobs,
    rank_neurons,
    sequence_logprob,
)
from switchkd.models import load_model, load_tokenizer

TOK = load_tokenizer(ModelConfig(name="tiny:gpt2"))
ITEM = Item("The old man and the boy met.", "Who was forgetful?", ("The old man", "The boy", "Unknown"), 2, "ambig")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return load_model(ModelConfig(name="tiny:gpt2,layers=2,dim=32,heads=2,seed=9"), TOK, trainable=False)


def test_neuron_modules_exclude_lm_head(gpt2):
    mods = neuron_modules(gpt2)
    assert "lm_head" not in mods and "transformer.h.0.attn.c_attn" in mods and "transformer.h.1.mlp.c_proj" in mods


def test_option_scoring_equals_manual_log_prob_sum(gpt2):
    got = option_logprobs(gpt2, TOK, [ITEM], INSTRUCTIONS[0])[0]
    p_ids = TOK(prompt(INSTRUCTIONS[0], ITEM), add_special_tokens=False)["input_ids"]
    for k, opt in enumerate(ITEM.options):
        a_ids = TOK(" " + opt, add_special_tokens=False)["input_ids"]
        logits = gpt2(torch.tensor([p_ids + a_ids])).logits[0].double()
        manual = sum(torch.log_softmax(logits[len(p_ids) + j - 1], -1)[t] for j, t in enumerate(a_ids))
        assert float(got[k]) == pytest.approx(float(manual), rel=1e-4, abs=1e-4)


def test_attribution_equals_finite_difference(gpt2):
    mods = neuron_modules(gpt2)
    name, unit = "transformer.h.1.mlp.c_fc", 5
    text, answer = prompt(INSTRUCTIONS[1], ITEM), ITEM.options[0]
    per_pos = attribution(gpt2, TOK, mods, text, answer, reduce="none")[name]  # [T, n_out]
    batch = _pair_batch(gpt2, TOK, [(text, answer)])
    gpt2_d = gpt2.double()
    try:
        for t in (3, per_pos.shape[0] - 2):
            eps = 1e-6

            def prob(delta, t=t):
                def hook(_m, _i, out):
                    out = out.clone()
                    out[0, t, unit] += delta
                    return out
                h = mods[name].register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        return float(sequence_logprob(gpt2_d, batch)[0].exp())
                finally:
                    h.remove()

            with torch.no_grad(), capture({name: mods[name]}) as acts:
                sequence_logprob(gpt2_d, batch)
            h_val = float(acts[name][0, t, unit])
            fd = (prob(eps) - prob(-eps)) / (2 * eps)
            assert float(per_pos[t, unit]) == pytest.approx(h_val * fd, rel=2e-3, abs=1e-9)
    finally:
        gpt2.float()


def test_pruning_zeroes_exactly_the_chosen_rows_and_restores(gpt2):
    with torch.no_grad():
        for m in neuron_modules(gpt2).values():
            m.bias.normal_()  # GPT-2 starts with zero biases; make their zeroing visible
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    p = Pruner(gpt2)
    p.prune([("transformer.h.0.mlp.c_fc", 3), ("transformer.h.1.attn.c_proj", 7)])
    after = gpt2.state_dict()
    fc, proj = "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"
    assert (after[fc + ".weight"][:, 3] == 0).all() and after[fc + ".bias"][3] == 0  # Conv1D: columns
    assert (after[proj + ".weight"][:, 7] == 0).all()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {fc + ".weight", fc + ".bias", proj + ".weight", proj + ".bias"}
    w = after[fc + ".weight"].clone()
    w[:, 3] = before[fc + ".weight"][:, 3]
    assert torch.equal(w, before[fc + ".weight"])  # nothing else in the matrix moved
    p.restore()
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())


class Planted(nn.Module):
    """A causal LM with one neuron (fc1 unit 7) that fires when '#' occurs and pushes the byte 'x'."""

    def __init__(self, vocab: int, trigger: int, target: int, d: int = 32, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.emb = nn.Embedding(vocab, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.02)
            self.emb.weight[:, 0] = 0
            self.emb.weight[trigger, 0] = 1.0  # dimension 0 flags the trigger token
            self.fc1.weight[7] = 0
            self.fc1.weight[7, 0], self.fc1.bias[7] = 1.0, 0.0
            u = torch.randn(d)
            u[0] = 0
            u = u / u.norm()
            self.fc2.weight[:, 7] = 2.0 * u  # spread over every output unit of fc2
            self.head.weight[target] += 1.5 * u  # +3 logits for 'x' once the trigger was seen

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, **_):
        x = self.emb(input_ids).cummax(dim=1).values  # "has appeared so far", per dimension
        return SimpleNamespace(logits=self.head(x + self.fc2(torch.relu(self.fc1(x)))))


def _planted_items(n: int, trigger: bool):
    items = []
    for i in range(n):
        ctx = f"Two people, {i}, met{' # ' if trigger else ' '}today."
        items.append(Item(ctx, "Who was it?", ("x", "y", "z"), (i % 2) + 1, "ambig"))
    return items


def test_planted_bias_neuron_ranks_first_and_pruning_removes_the_bias():
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    trig, tgt = tok("#", add_special_tokens=False)["input_ids"][0], tok("x", add_special_tokens=False)["input_ids"][0]
    model = Planted(len(tok), trig, tgt).eval()
    triggered, clean = _planted_items(12, True), _planted_items(12, False)
    ins = list(INSTRUCTIONS[:2])

    def picks_x(items):
        return float((option_logprobs(model, tok, items, ins[0]).argmax(-1) == 0).float().mean())

    assert picks_x(triggered) == 1.0 and picks_x(clean) < 0.5  # the planted bias
    ranked = rank_neurons(bias_scores(model, tok, triggered[:6], ins))
    assert ranked[0][:2] == ("fc1", 7)
    assert ranked[0][2] > 2 * abs(ranked[1][2])
    Pruner(model).prune([ranked[0][:2]])
    assert picks_x(triggered) == picks_x(clean)
    assert accuracy(model, tok, triggered, ins)["ambig"]["mean"] > 0.0


def test_encoder_decoder_models_work():
    cfg = T5Config(vocab_size=len(TOK), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
                   decoder_start_token_id=TOK.pad_token_id, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(cfg).eval()
    mods = neuron_modules(t5)
    assert any(".EncDecAttention." in n for n in mods) and "lm_head" not in mods
    lp = option_logprobs(t5, TOK, [ITEM], INSTRUCTIONS[0])
    assert lp.shape == (1, 3) and torch.isfinite(lp).all()
    scores = bias_scores(t5, TOK, [ITEM], INSTRUCTIONS[:1])
    assert set(scores) == set(mods)


def test_bbq_reader_errors(tmp_path, shared):
    items = read_bbq([shared / "data/bbq/Religion.jsonl"])
    assert len(items) == 1200 and {i.condition for i in items} == {"ambig", "disambig"}
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"context": "c", "question": "q", "ans0": "a", "ans1": "b", "ans2": "c", "label": 5}) + "\n")
    with pytest.raises(ConfigError, match=r"b.jsonl:1: label must be 0, 1 or 2"):
        read_bbq([bad])
    bad.write_text('{"context": "c"}\n')
    with pytest.raises(ConfigError, match=r"b.jsonl:1: not a BBQ record: missing 'question'"):
        read_bbq([bad])


def test_debias_cli_end_to_end_on_stored_bbq(shared, tmp_path):
    model_dir = tmp_path / "m"
    model = load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), TOK)
    model.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["debias", "--model", str(model_dir), "--data", str(shared / "data/bbq/Age.jsonl"),
               str(shared / "data/bbq/Religion.jsonl"), "--output", str(out), "--limit", "40", "--instances", "2",
               "--instructions", "2", "--candidates", "0", "1", "3", "--eval-limit", "12"])
    assert rc == 0
    report = json.loads((out / "debias_report.json").read_text())
    assert report["n"] in (0, 1, 3) and len(report["neurons"]) == report["n"]
    assert {"ambig", "disambig", "all"} >= set(report["before"]) and "mean" in report["after"]["all"]
    assert (out / "model.safetensors").is_file() and (out / "debias_report.md").read_text().startswith("# CRISPR")
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out)
    for x in report["neurons"]:
        w = dict(pruned.named_modules())[x["module"]].weight
        assert (w[:, x["index"]] == 0).all()


def test_debias_never_deletes_an_existing_output_and_rejects_bad_flags(shared, tmp_path, capsys):
    model_dir = tmp_path / "m"
    model = load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), TOK)
    model.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("user data")
    data = str(shared / "data/bbq/Age.jsonl")
    base = ["debias", "--model", str(model_dir), "--data", data, "--limit", "40", "--instances", "2",
            "--instructions", "2", "--candidates", "0", "1", "--eval-limit", "8"]
    assert main(base + ["--output", str(keep)]) == 2
    assert "already exists" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (keep / "precious.txt").read_text() == "user data" and sorted(p.name for p in keep.iterdir()) == ["precious.txt"]
    for bad in (["--dev-fraction", "1.0"], ["--instances", "0"], ["--limit", "1"], ["--candidates", "-1"]):
        assert main(base[:-2] + ["--candidates", "0"] + bad + ["--output", str(tmp_path / "new")]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("switchkd: error:"), err
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
