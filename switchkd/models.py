"""Loading teacher and student causal LMs and their tokenizer.

A model spec is a hub id, a local ``save_pretrained`` directory, or a ``tiny:``
spec that builds a small random model offline:
``tiny:gpt2`` or ``tiny:llama,layers=2,dim=64,heads=4,kv_heads=2,ffn=128,seed=0``.
Tiny models use transformers' byte-level ByT5 tokenizer, which needs no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from switchkd.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_DEFAULTS = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "ffn": 0, "positions": 1024, "seed": 0}


@dataclass
class TinySpec:
    arch: str
    layers: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    positions: int
    seed: int


def parse_tiny(spec: str) -> TinySpec:
    """Parse ``tiny:ARCH[,key=value...]``; raise :class:`ConfigError` on a bad spec."""
    head, *rest = spec[len("tiny:"):].split(",")
    if head not in ("gpt2", "llama"):
        raise ConfigError(f"model spec {spec!r}: tiny architecture must be gpt2 or llama")
    values: Dict[str, int] = dict(TINY_DEFAULTS)
    for item in rest:
        key, _, val = item.partition("=")
        if key not in TINY_DEFAULTS or not val.lstrip("-").isdigit():
            raise ConfigError(f"model spec {spec!r}: bad item {item!r}; keys: {', '.join(TINY_DEFAULTS)} (integers)")
        values[key] = int(val)
    return TinySpec(arch=head, **values)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (ByT5: pad 0, eos 1, unk 2, bytes 3..258) that needs no download."""
    return ByT5Tokenizer()


def build_tiny(spec: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised GPT-2 or Llama sized by ``spec``, seeded for reproducibility."""
    t = parse_tiny(spec)
    vocab = len(tokenizer)
    ffn = t.ffn or 4 * t.dim
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if t.arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=t.positions, n_embd=t.dim, n_layer=t.layers, n_head=t.heads,
                         n_inner=ffn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=t.dim, intermediate_size=ffn, num_hidden_layers=t.layers,
                          num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, max_position_embeddings=t.positions,
                          tie_word_embeddings=True, **special)
        cls = LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        return cls(cfg)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg``, left-padded, with a pad token."""
    name = cfg.tokenizer or cfg.name
    if name.startswith("tiny:"):
        tok = tiny_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer {name!r}: cannot load ({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, trainable: bool = True) -> PreTrainedModel:
    """Load (or build) the model; a non-trainable model is frozen and in eval mode."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name.startswith("tiny:"):
        model = build_tiny(cfg.name, tokenizer).to(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name, revision=cfg.revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {cfg.name!r}: cannot load ({str(exc).splitlines()[0]})") from None
    if len(tokenizer) > model.get_output_embeddings().weight.shape[0]:
        raise ConfigError(f"model {cfg.name!r}: tokenizer has {len(tokenizer)} tokens but the LM head only "
                          f"{model.get_output_embeddings().weight.shape[0]} rows")
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def check_compatible(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> int:
    """Return the shared true vocabulary size, or raise if the tokenizers differ.

    Compares the token-to-id maps and special tokens, not only sizes; embedding
    matrices padded to larger sizes are fine (logits are cut to this size).
    """
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens, or different "
            "ids for the same tokens); token-level distillation needs a shared vocabulary"
        )
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            raise ConfigError(f"teacher and student tokenizers differ in {attr}")
    return len(student_tok)


def load_pair(
    student_cfg: ModelConfig, teacher_cfg: Optional[ModelConfig]
) -> Tuple[PreTrainedModel, Optional[PreTrainedModel], PreTrainedTokenizerBase, int]:
    """Student (trainable), frozen teacher (or None), the shared tokenizer and the true vocab size."""
    tok = load_tokenizer(student_cfg)
    student = load_model(student_cfg, tok)
    teacher = None
    vocab = len(tok)
    if teacher_cfg is not None:
        t_tok = load_tokenizer(teacher_cfg)
        vocab = check_compatible(tok, t_tok)
        teacher = load_model(teacher_cfg, t_tok, trainable=False)
    return student, teacher, tok, vocab
