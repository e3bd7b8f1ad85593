"""Small models with a real instruction model's properties, built offline for the tests.

``chatml_pair``: GPT-2's BPE tokenizer (../shared/data/gpt2_tokenizer) with ChatML's ``<|im_start|>`` /
``<|im_end|>`` added, ``<|im_end|>`` both EOS and pad, SmolLM2-Instruct's chat template; a Llama with
tied embeddings and grouped-query attention (as SmolLM2-135M-Instruct).  ``write_gguf``: the same kind of
Llama as a GGUF file (gguf's own writer; float32 tensors, GPT-2 BPE vocabulary in the metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                 "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer(shared: Path) -> Any:
    """GPT-2 BPE + ChatML specials; EOS = pad = ``<|im_end|>``; the SmolLM2 chat template."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(shared / "data/gpt2_tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.bos_token = "<|im_start|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chatml_llama(tok: Any, layers: int = 4, dim: int = 32, seed: int = 0) -> Any:
    """A random Llama (tied embeddings, 4 heads, 2 KV heads) over ``tok``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def chatml_model_dir(shared: Path, out: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save :func:`chatml_llama` and :func:`chatml_tokenizer` to ``out``."""
    tok = chatml_tokenizer(shared)
    chatml_llama(tok, layers, seed=seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_gguf(shared: Path, path: Path, layers: int = 2, dim: int = 32, seed: int = 0, merges: int = 2000) -> Path:
    """A tiny Llama GGUF file (float32) with a byte-level BPE vocabulary (GPT-2's first ``merges``
    merges, kept small so that transformers converts it quickly), ChatML tokens and chat template;
    ``<|im_end|>`` is EOS and pad."""
    import json

    import gguf

    vocab = json.loads((shared / "data/gpt2_tokenizer/vocab.json").read_text(encoding="utf-8"))
    tokens = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < 256 + merges]
    merge_lines = [line for line in (shared / "data/gpt2_tokenizer/merges.txt").read_text(encoding="utf-8").splitlines()
                   if line and not line.startswith("#version")][:merges]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    special = {len(tokens) - 3, len(tokens) - 2, len(tokens) - 1}

    class tok:  # noqa: N801  (the ids the metadata names)
        bos_token_id, eos_token_id = len(tokens) - 2, len(tokens) - 1
        pad_token_id = eos_token_id
    w = gguf.GGUFWriter(str(path), "llama")
    heads, kv, ffn = 4, 2, 2 * dim
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merge_lines)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head = dim // heads
    w.add_tensor("token_embd.weight", t(len(tokens), dim))
    w.add_tensor("output_norm.weight", 1 + t(dim))
    for i in range(layers):
        p = f"blk.{i}."
        for name, shape in (("attn_norm", (dim,)), ("ffn_norm", (dim,))):
            w.add_tensor(p + name + ".weight", 1 + t(*shape))
        for name, shape in (("attn_q", (dim, dim)), ("attn_k", (kv * head, dim)), ("attn_v", (kv * head, dim)),
                            ("attn_output", (dim, dim)), ("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)),
                            ("ffn_down", (dim, ffn))):
            w.add_tensor(p + name + ".weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
