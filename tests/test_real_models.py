"""A real instruction model's properties on small models: GGUF conversion, shrinking, ChatML prompts,
pad = EOS, tied embeddings with grouped-query attention, SWITCH per model token, speculative drafts,
and the configs/smollm2 presets trained a few steps."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realish import chatml_llama, chatml_model_dir, chatml_tokenizer, write_gguf  # noqa: E402

from switchkd.cli import main  # noqa: E402
from switchkd.config import ConfigError, DataConfig, ModelConfig  # noqa: E402
from switchkd.data import build_batch, left_pad, load_examples, tokenize  # noqa: E402
from switchkd.models import load_model, load_tokenizer  # noqa: E402
from switchkd.rollout import Gate, RolloutConfig, StudentWrites, rollout  # noqa: E402

pytest.importorskip("gguf")


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("switchkd: error:") and len(err.splitlines()) == 1, (code, err)
    return err


@pytest.fixture(scope="module")
def pair(shared, tmp_path_factory):
    """A ChatML teacher (4 blocks) saved to disk, with its tokenizer."""
    root = tmp_path_factory.mktemp("chatml")
    return chatml_model_dir(shared, root / "teacher", layers=4, seed=1)


@pytest.fixture(scope="module")
def gguf_file(shared, tmp_path_factory):
    return write_gguf(shared, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# --- convert gguf ---------------------------------------------------------------------------------

def test_convert_gguf_equals_transformers_gguf_load(gguf_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.gguf import load_gguf

    assert main(["convert", "gguf", str(gguf_file), str(tmp_path / "out")]) == 0
    ref, ref_tok = load_gguf(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert not hasattr(model.config, "quantization_config")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    ids = torch.tensor([tok("Give three tips for staying healthy.")["input_ids"]])
    assert ids.tolist() == [ref_tok("Give three tips for staying healthy.")["input_ids"]]
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_convert_gguf_bad_inputs_are_one_line(gguf_file, tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:5000])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    cases = [(tmp_path / "none.gguf", "no such file"), (tmp_path, "is a directory"), (junk, "not a GGUF file"),
             (cut, "cannot load as GGUF")]
    for src, msg in cases:
        assert msg in _one_line_error(capsys, main(["convert", "gguf", str(src), str(tmp_path / "o")]))
        assert not (tmp_path / "o").exists()
    assert "already exists" in _one_line_error(capsys, main(["convert", "gguf", str(gguf_file), str(taken)]))
    assert (taken / "x").read_text() == "keep"


def test_convert_gguf_names_the_missing_package(gguf_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    err = _one_line_error(capsys, main(["convert", "gguf", str(gguf_file), str(tmp_path / "o")]))
    assert "pip install -e '.[gguf]'" in err and not (tmp_path / "o").exists()


# --- shrink ---------------------------------------------------------------------------------------

def test_even_layers_keep_first_and_last():
    from switchkd.shrink import even_layers

    assert even_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert even_layers(4, 2) == [0, 3] and even_layers(5, 5) == [0, 1, 2, 3, 4] and even_layers(7, 1) == [0]
    with pytest.raises(ConfigError, match="expected 1..4"):
        even_layers(4, 5)


def _keep_blocks(model, keep):
    """The oracle: the original model with its other decoder blocks removed in place."""
    import copy

    m = copy.deepcopy(model)
    inner = m.transformer if hasattr(m, "transformer") else m.model
    name = "h" if hasattr(inner, "h") else "layers"
    setattr(inner, name, torch.nn.ModuleList([getattr(inner, name)[i] for i in keep]))
    for i, block in enumerate(getattr(inner, name)):
        for mod in block.modules():  # Llama attention indexes its cache by layer_idx
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    m.config.num_hidden_layers = len(keep)
    return m


@pytest.mark.parametrize("kind", ["chatml-llama", "gpt2"])
def test_shrink_equals_the_kept_blocks(kind, pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gpt2":
        tok = load_tokenizer(ModelConfig(name="tiny:gpt2,layers=4,dim=32,heads=2"))
        big = load_model(ModelConfig(name="tiny:gpt2,layers=4,dim=32,heads=2"), tok, trainable=False)
        src = tmp_path / "big"
        big.save_pretrained(src)
        tok.save_pretrained(src)
    else:
        src = pair
    assert main(["shrink", str(src), str(tmp_path / "small"), "--layers", "2", "--even"]) == 0
    assert "kept decoder blocks 0,3" in capsys.readouterr().out
    big = AutoModelForCausalLM.from_pretrained(src).eval()
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert small.config.num_hidden_layers == 2
    assert small.config.tie_word_embeddings == big.config.tie_word_embeddings
    ids = torch.tensor([[5, 60, 200, 31, 9]])
    with torch.no_grad():
        assert torch.equal(small(ids).logits, _keep_blocks(big, [0, 3])(ids).logits)
    if kind != "gpt2":
        assert small.get_output_embeddings().weight.data_ptr() == small.get_input_embeddings().weight.data_ptr()
        assert small.config.num_key_value_heads == 2
        stok = AutoTokenizer.from_pretrained(tmp_path / "small")
        assert stok.chat_template == AutoTokenizer.from_pretrained(src).chat_template
    assert main(["shrink", str(src), str(tmp_path / "picked"), "--keep", "1,2"]) == 0
    picked = AutoModelForCausalLM.from_pretrained(tmp_path / "picked").eval()
    with torch.no_grad():
        assert torch.equal(picked(ids).logits, _keep_blocks(big, [1, 2])(ids).logits)


def test_shrink_refuses_what_it_cannot_cut(pair, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    (tmp_path / "notamodel").mkdir()
    cases = [(["--keep", "0,4"], "outside 0..3"), (["--keep", "2,1"], "distinct and increasing"),
             (["--keep", "0,0"], "distinct and increasing"), (["--keep", "a,b"], "comma-separated"),
             (["--layers", "5", "--even"], "expected 1..4"), (["--layers", "2"], "give --data FILE"),
             (["--keep", "1", "--even"], "--even goes with --layers")]
    for flags, msg in cases:
        assert msg in _one_line_error(capsys, main(["shrink", str(pair), str(tmp_path / "o"), *flags]))
        assert not (tmp_path / "o").exists()
    assert "already exists" in _one_line_error(capsys, main(["shrink", str(pair), str(tmp_path / "full"), "--layers", "2", "--even"]))
    assert "cannot load" in _one_line_error(capsys, main(["shrink", str(tmp_path / "notamodel"), str(tmp_path / "o"),
                                                          "--layers", "2", "--even"]))
    assert main(["shrink", str(pair), str(tmp_path / "o"), "--layers", "0"]) == 2
    assert main(["shrink", str(pair), str(tmp_path / "o"), "--layers", "2", "--keep", "0"]) == 2
    assert not (tmp_path / "o").exists()


# --- chat template, pad = EOS, SWITCH per token ---------------------------------------------------

def test_chat_prompts_and_eos_labels_with_pad_equal_to_eos(shared, pair):
    tok = load_tokenizer(ModelConfig(name=str(pair)))
    assert tok.pad_token_id == tok.eos_token_id
    dolly = shared / "data/minillm_data/dolly/valid.jsonl"
    ex = load_examples(str(dolly), DataConfig(format="minillm", template="chat"), tok, 4)
    row = json.loads(dolly.read_text().splitlines()[0])
    user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    want = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert ex[0].prompt == want
    items, _ = tokenize(ex, tok, 400, 800)
    assert items[0].prompt == tok(want)["input_ids"] and tok.eos_token_id in items[0].prompt  # the system turn's end
    assert items[0].response[-1] == tok.eos_token_id
    b = build_batch([x.prompt for x in items], [x.response for x in items], tok.pad_token_id, [x.index for x in items])
    for i, x in enumerate(items):  # the real EOS is a label; the pads after it (same id) are not
        end = len(x.prompt) + len(x.response)
        assert b.labels[i, end - 1] == tok.eos_token_id
        assert (b.labels[i, end:] == -100).all() and (b.attention_mask[i, end:] == 0).all()
        assert (b.labels[i, : len(x.prompt)] == -100).all()


def test_generation_stops_at_the_template_end_token(shared):
    tok = chatml_tokenizer(shared)
    model = chatml_llama(tok, layers=2, seed=5)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Hi", "Name a colour.", "Why is the sky blue? Explain briefly.")]
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    N = 40

    def hf():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]

    # make <|im_end|> the argmax wherever the most frequent later token was (its head row, slightly larger)
    common = torch.mode(hf()[:, 1:].flatten()).values
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.01 * model.lm_head.weight[common]
    ref = hf()
    out = rollout(model, None, ids, mask, RolloutConfig(max_new_tokens=N, do_sample=False,
                                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                  StudentWrites())
    ended = 0
    for i in range(len(prompts)):
        n = int(out.response_mask[i].sum())
        got = out.sequences[i, ids.shape[1]:][: n].tolist()
        assert got == ref[i, : n].tolist()
        if tok.eos_token_id in got:
            ended += 1
            assert got.index(tok.eos_token_id) == n - 1  # nothing after the end token
            assert (out.sequences[i, ids.shape[1] + n:] == tok.pad_token_id).all()
    assert ended >= 1


def test_switch_decay_counts_model_tokens(shared):
    """tau_t = tau0 exp(-decay t) with t = the response's token index (BPE tokens here, not bytes)."""
    tok = chatml_tokenizer(shared)
    student, teacher = chatml_llama(tok, 2, seed=3), chatml_llama(tok, 3, seed=4)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Hello", "Tell me about tokenizers.")]
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    cfg = RolloutConfig(max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, speculative=False)
    probe = rollout(student, teacher, ids, mask, cfg, Gate(tau0=float("inf"), decay=0.1))
    tau0 = float(probe.gate[probe.response_mask].median()) * math.exp(0.1 * 8)  # crosses the median near t = 8
    out = rollout(student, teacher, ids, mask, cfg, Gate(tau0=tau0, decay=0.1))
    t = torch.arange(24).expand_as(out.gate)
    want = out.gate.double() > tau0 * torch.exp(-0.1 * t.double())
    assert torch.equal(out.from_teacher[out.response_mask], want[out.response_mask])
    assert 0 < int(out.from_teacher[out.response_mask].sum()) < int(out.response_mask.sum())


# --- speculative drafts ---------------------------------------------------------------------------

def test_draft_stats_follow_greedy_speculative_decoding(shared):
    from switchkd.speculative import draft_stats

    tok = chatml_tokenizer(shared)
    target, draft = chatml_llama(tok, 3, seed=4), chatml_llama(tok, 2, seed=3)
    with torch.no_grad():  # a draft that agrees with the target part of the time
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.model.norm.weight.copy_(target.model.norm.weight)
    ids, mask = left_pad([tok(p)["input_ids"] for p in ("Hello there", "A longer prompt, with words")],
                         tok.pad_token_id)
    args = (ids, mask, 4, 20, tok.eos_token_id, tok.pad_token_id, len(tok))
    self_ = draft_stats(target, target, *args)
    assert self_["tokens_per_verification"] == 4.0 and self_["acceptance"] == 1.0
    r = draft_stats(draft, target, *args)
    assert 1.0 <= r["tokens_per_verification"] <= 4.0
    assert r["accepted_per_verification"] == pytest.approx(r["tokens_per_verification"] - (1 - r["acceptance"])
                                                          * r["tokens"] / r["verifications"])
    # the oracle: every decided token is the target's greedy token, so the drafts' count is recomputable
    from switchkd.decoding import RolloutConfig as RC
    from switchkd.speculative import speculative_switch

    out = speculative_switch(draft, target, ids, mask, RC(max_new_tokens=20, do_sample=False,
                             eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, vocab_size=len(tok), draft_k=4, max_draft_k=4,
                             adapt_k=False), Gate(tau0=0.5, schedule="const", divergence="argmax"))
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    for i in range(2):
        n = int(out.response_mask[i].sum())
        assert out.sequences[i, ids.shape[1]:][:n].tolist() == ref[i, :n].tolist()
    greedy_student = [(draft(out.sequences[:, : ids.shape[1] + j], attention_mask=torch.cat(
        [mask, torch.ones(2, j, dtype=mask.dtype)], 1)).logits[:, -1].argmax(-1)) for j in range(20)]
    agree = torch.stack(greedy_student, 1) == out.sequences[:, ids.shape[1]:]
    assert torch.equal(~out.from_teacher[out.response_mask], agree[out.response_mask])
    assert r["acceptance"] == pytest.approx(float(agree[out.response_mask].float().mean()))


def test_eval_draft_for_reports_the_draft(pair, shared, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in ("yes", "no", "maybe")))
    rc = main(["eval", "--model", str(pair), "--data", str(data), "--greedy", "--template", "chat",
               "--max-new-tokens", "8", "--output", str(tmp_path / "ev"), "--draft-for", str(pair)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "4.00 tokens per verification" in out
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["draft"]["d"]["acceptance"] == 1.0 and scores["draft"]["d"]["n"] == 3
    rc = main(["eval", "--model", str(pair), "--data", str(data), "--output", str(tmp_path / "ev2"),
               "--draft-for", "tiny:gpt2"])
    assert "tokenizers differ" in _one_line_error(capsys, rc)


# --- SWITCH diagnostics ---------------------------------------------------------------------------

def test_saturation_warning_and_ln2_note():
    from switchkd.calibrate import ln2_note
    from switchkd.methods.switch import saturation_warning

    assert saturation_warning(0.5, 100, 0.1) is None
    assert "teacher wrote 100%" in saturation_warning(1.0, 100, 0.1)
    assert "student wrote 2%" in saturation_warning(0.02, 100, 0.1)
    assert ln2_note(Gate(tau0=0.5, decay=0.1)) is None and ln2_note(Gate(tau0=2.87, decay=0.1, divergence="tvd")) is None
    note = ln2_note(Gate(tau0=2.87, decay=0.1))
    assert "exceeds ln 2" in note and f"first {math.ceil(math.log(2.87 / math.log(2)) / 0.1)} tokens" in note


# --- the configs/smollm2 presets ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sft", "kd", "seqkd", "gkd", "distillm", "minillm", "switch", "heal"])
def test_smollm2_presets_train_on_a_model_with_the_same_properties(method, pair, shared, tmp_path, capsys):
    """Each preset as shipped (chat template, loss_chunk, its method section) on a ChatML / pad = EOS /
    tied / GQA pair: a 2-block student cut from the teacher (heal: pruned in width and depth by ``switchkd
    prune`` on Dolly) trains, and its weights move."""
    from safetensors.torch import load_file

    student = tmp_path / "student"
    dolly = shared / "data/minillm_data/dolly"
    if method == "heal":
        assert main(["prune", str(pair), str(student), "--hidden", "24", "--mlp", "32", "--heads-per-group", "1",
                     "--layers", "2", "--data", str(dolly / "train.jsonl"), "--samples", "8"]) == 0
    else:
        assert main(["shrink", str(pair), str(student), "--layers", "2", "--even"]) == 0
    over = [f"model.name={student}", f"teacher.name={pair}", f"data.train={dolly / 'train.jsonl'}",
            f"data.dev={dolly / 'dev.jsonl'}", "data.limit=12", "data.max_prompt_length=120", "data.max_length=160",
            "method.max_new_tokens=8", "train.max_steps=2", "train.batch_size=2", "train.eval_every=1",
            "train.save_every=0", "train.keep_best=false", "eval.limit=2", "eval.max_new_tokens=4",
            "method.distillm.dev_limit=4",
            f"output.dir={tmp_path / 'run'}"]
    if method == "sft":
        over = [o for o in over if not o.startswith("teacher.")]
    if method == "switch":
        over.append("method.switch.tau0=1e-9")  # every gate exceeds it: the teacher writes everything
    assert main(["train", f"smollm2/{method}", *over]) == 0
    err = capsys.readouterr().err
    before, after = load_file(student / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    if method == "switch":
        assert rows[-1]["switch/teacher_frac"] == 1.0 and "SWITCH: the teacher wrote 100%" in err
