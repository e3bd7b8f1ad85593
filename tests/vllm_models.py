"""Tiny Llama models vLLM can serve (GPT-2's BPE tokenizer from ``../shared``, head size 64), and the suite's
vLLM server: ``python tests/vllm_models.py serve DIR PORT`` builds the teacher into DIR and runs vLLM's
OpenAI-compatible server on 127.0.0.1:PORT (started once per ``make test`` by ``tests/conftest.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "data" / "gpt2_tokenizer"


def build(out: str | Path, layers: int = 2, seed: int = 0, init: float = 0.3) -> Path:
    """A random Llama (hidden 128, two query heads of 64 sharing one KV head, tied embeddings) with GPT-2's
    tokenizer (pad = EOS) saved to ``out``; ``init``: the weights' standard deviation (0.3: peaked
    next-token distributions)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=True, initializer_range=init)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def server_command(model: str | Path, port: int, max_logprobs: int = 50) -> list:
    """vLLM's OpenAI-compatible server on 127.0.0.1:``port`` (what ``switchkd serve-teacher`` runs)."""
    return [sys.executable, "-m", "switchkd", "serve-teacher", str(model), "--port", str(port), "--host", "127.0.0.1",
            "--max-logprobs", str(max_logprobs), "--max-model-len", "512", "--dtype", "float32"]


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    directory, port = Path(sys.argv[2]), int(sys.argv[3])
    if not (directory / "config.json").is_file():
        build(directory)
    os.execv(sys.executable, server_command(directory, port))
