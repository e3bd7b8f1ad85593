"""Tiny Llama models vLLM can serve (GPT-2's BPE tokenizer from ``../shared``, head size 64), and the suite's
vLLM server: ``python tests/vllm_models.py serve DIR PORT`` builds the teacher into DIR and runs vLLM's
OpenAI-compatible server on 127.0.0.1:PORT (started once per ``make test`` by ``tests/conftest.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "data" / "gpt2_tokenizer"

#: DistiLLM with student samples from the first step, its dev CE measured on a small dev set
DISTILLM = ["method.distillm.init_student_prob=1.0", "data.dev=synthetic:dev", "eval.limit=4",
            "method.distillm.validate=eval_every", "method.distillm.dev_limit=4", "train.eval_every=2"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def server_env() -> dict:
    """The environment of the suite's servers: a 1 GiB KV cache, and vLLM's model worker inside its engine-core process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` lets the CPU platform keep the single-process executor; by default it starts
    a third process, which imports vLLM again: about 10 s more per start on 2 cores).  The HTTP server, its engine and
    its answers are the same."""
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")


def server_command(model: str | Path, port: int, max_logprobs: int = 50) -> list:
    """vLLM's OpenAI-compatible server on 127.0.0.1:``port`` (what ``switchkd serve-teacher`` runs)."""
    return [sys.executable, "-m", "switchkd", "serve-teacher", str(model), "--port", str(port), "--host", "127.0.0.1",
            "--max-logprobs", str(max_logprobs), "--max-model-len", "512", "--dtype", "float32"]


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    directory, port = Path(sys.argv[2]), int(sys.argv[3])
    if not (directory / "config.json").is_file():
        build(directory)
    os.execv(sys.executable, server_command(directory, port))
