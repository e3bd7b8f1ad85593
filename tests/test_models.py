"""Tiny model specs, tokenizer compatibility, padded vocabularies, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2TokenizerFast

from switchkd.config import ConfigError, ModelConfig
from switchkd.losses import shifted
from switchkd.models import check_compatible, load_model, load_pair, load_tokenizer, parse_tiny


def test_tiny_specs_build_both_architectures():
    for spec, cls in (("tiny:gpt2,layers=1,dim=32,heads=2", "GPT2LMHeadModel"),
                      ("tiny:llama,layers=1,dim=32,heads=4,kv_heads=2", "LlamaForCausalLM")):
        tok = load_tokenizer(ModelConfig(name=spec))
        m = load_model(ModelConfig(name=spec), tok)
        assert type(m).__name__ == cls and m.config.vocab_size == len(tok)
    with pytest.raises(ConfigError, match="bad item 'depth=3'"):
        parse_tiny("tiny:gpt2,depth=3")
    with pytest.raises(ConfigError, match="gpt2 or llama"):
        parse_tiny("tiny:bert")


def test_tiny_models_are_seeded():
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    a = load_model(ModelConfig(name="tiny:gpt2,seed=3"), tok)
    b = load_model(ModelConfig(name="tiny:gpt2,seed=3"), tok)
    c = load_model(ModelConfig(name="tiny:gpt2,seed=4"), tok)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_teacher_is_frozen_and_in_eval_mode():
    s, t, tok, vocab = load_pair(ModelConfig(name="tiny:gpt2"), ModelConfig(name="tiny:llama"))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert s.training is not None and all(p.requires_grad for p in s.parameters()) and vocab == len(tok)


def test_incompatible_tokenizers_are_rejected(shared):
    gpt2 = GPT2TokenizerFast.from_pretrained(shared / "data/gpt2_tokenizer")
    byt5 = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_compatible(byt5, gpt2)
    assert check_compatible(gpt2, gpt2) == 50257


def test_padded_embedding_rows_are_cut_to_true_vocab(tmp_path):
    """A teacher whose LM head has extra rows (e.g. 152064 vs 151936) is read at the true vocabulary."""
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    big = load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), tok)
    big.resize_token_embeddings(len(tok) + 64)
    big.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    s, t, tok2, vocab = load_pair(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), ModelConfig(name=str(tmp_path / "t")))
    assert t.get_output_embeddings().weight.shape[0] == len(tok) + 64 and vocab == len(tok)
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, 6, 7, 8]])
    logits, target = shifted(t(ids).logits, labels, vocab)
    assert logits.shape == (3, len(tok))


def test_saved_model_loads_in_plain_transformers(tmp_path):
    tok = load_tokenizer(ModelConfig(name="tiny:llama"))
    m = load_model(ModelConfig(name="tiny:llama"), tok)
    m.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(again(ids).logits, m(ids).logits)


def test_missing_model_is_a_clear_error(tmp_path):
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    with pytest.raises(ConfigError, match="no such local directory"):
        load_model(ModelConfig(name=str(tmp_path / "nothing")), tok)
