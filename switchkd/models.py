"""Loading teacher and student causal LMs and their tokenizer.

A model spec is a hub id, a local ``save_pretrained`` directory, or a ``tiny:``
spec that builds a small random model offline:
``tiny:gpt2`` or ``tiny:llama,layers=2,dim=64,heads=4,kv_heads=2,ffn=128,seed=0``.
Tiny models use transformers' byte-level ByT5 tokenizer, which needs no files.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import huggingface_hub.utils as hf_hub_utils
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
from transformers.utils import logging as hf_logging

from switchkd.sections import ConfigError, LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_DEFAULTS = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "ffn": 0, "positions": 1024, "seed": 0}

# transformers' per-load "Loading weights" bars are noise around our own progress and errors; the hub's
# download bars stay (a first download is worth watching)
hf_logging.disable_progress_bar()
hf_hub_utils.enable_progress_bars()


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


def _local_path_missing(name: str) -> bool:
    """A name written as a local path (``/x``, ``./x``, ``~/x``, ``x/y/z``) that does not exist."""
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    return looks_local and not Path(name).expanduser().exists()


def check_name(name: str) -> None:
    """A model name that cannot be a model: a missing local path, a file (a GGUF file: what to run)."""
    if _local_path_missing(name):
        raise ConfigError(f"model {name!r}: no such local directory")
    if Path(name).expanduser().is_file():
        fix = ("a GGUF file: convert it with switchkd convert gguf FILE.gguf DIR and use DIR" if name.endswith(".gguf")
               else "expected a model directory (config.json, weights, tokenizer) or a hub id")
        raise ConfigError(f"model {name!r} is a file: {fix}")


@contextlib.contextmanager
def unreadable(what: str) -> Iterator[None]:
    """Turn a failure to read a model's files (missing, truncated or garbage weights, a config.json of the wrong
    type, a bad adapter: OSError, ValueError, SafetensorError, TypeError, ...) into one ConfigError naming
    ``what``; out of memory and ConfigErrors pass through."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{what}: cannot load ({type(exc).__name__}: {first}){_hint(str(exc))}") from None


def _hint(text: str) -> str:
    """What to do about a load failure users commonly meet: a hub id without hub access, a GGUF file."""
    lowered = text.lower()
    if "huggingface.co" in lowered or "offline" in lowered or "hf_hub_offline" in lowered:
        return ("; the Hugging Face Hub is not reachable: point the config at a local model directory (teacher.name=DIR "
                "or model.name=DIR; switchkd convert gguf FILE.gguf DIR makes one from a GGUF file)")
    if "gguf" in lowered:
        return "; a GGUF file: convert it with switchkd convert gguf FILE.gguf DIR and use DIR"
    return ""


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg``, left-padded, with a pad token."""
    name = cfg.tokenizer or cfg.name
    check_name(name)
    if name.startswith("tiny:"):
        tok = tiny_tokenizer()
    else:
        with unreadable(f"tokenizer {name!r}"):
            tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision)
        if len(tok) < 2 or not tok("a b", add_special_tokens=False)["input_ids"]:
            raise ConfigError(f"tokenizer {name!r}: empty (no tokenizer files there?); save the tokenizer with the model "
                              "(tokenizer.save_pretrained) or name one with model.tokenizer / teacher.tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def adapter_base(path: str) -> Optional[str]:
    """The base model named by a peft adapter directory (``adapter_config.json``), else None."""
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        return None
    with unreadable(str(f)):
        meta = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ConfigError(f"{f}: expected a JSON object (a peft adapter config), got {type(meta).__name__}")
    base = meta.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{f}: base_model_name_or_path is empty; set model.name to the base and model.adapter to {path}")
    return str(base)


def with_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """``model`` with the peft LoRA adapter at ``adapter`` merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"adapter {adapter!r}: LoRA needs peft (pip install -e '.[peft]')") from None
    with unreadable(f"adapter {adapter!r}"):
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def add_lora(model: PreTrainedModel, lora: LoraConfig, base_name: str) -> Any:
    """Wrap ``model`` in a trainable peft LoRA model (only the adapter's parameters train)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("model.lora: LoRA needs peft (pip install -e '.[peft]')") from None
    spec = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                          target_modules=list(lora.target_modules) if lora.target_modules else "all-linear")
    try:
        peft_model = get_peft_model(model, spec)
    except ValueError as exc:
        raise ConfigError(f"model.lora: {str(exc).splitlines()[0]}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # so a saved adapter reloads
    return peft_model


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, trainable: bool = True) -> PreTrainedModel:
    """Load (or build) the model, merging ``cfg.adapter`` (or the adapter that ``cfg.name`` is);
    a non-trainable model is frozen and in eval mode."""
    check_name(cfg.name)
    base = adapter_base(cfg.name) if not cfg.name.startswith("tiny:") else None
    if base is not None:  # a saved LoRA adapter: its base, with the adapter merged
        model = with_adapter(load_model(replace(cfg, name=base, adapter=None), tokenizer), cfg.name)
        return _finish(model, cfg, trainable)
    dtype = DTYPES[cfg.dtype]
    if cfg.name.startswith("tiny:"):
        model = build_tiny(cfg.name, tokenizer).to(dtype)
    else:
        with unreadable(f"model {cfg.name!r}"):
            model = AutoModelForCausalLM.from_pretrained(cfg.name, revision=cfg.revision, dtype=dtype)
    if len(tokenizer) > model.get_output_embeddings().weight.shape[0]:
        raise ConfigError(f"model {cfg.name!r}: tokenizer has {len(tokenizer)} tokens but the LM head only "
                          f"{model.get_output_embeddings().weight.shape[0]} rows")
    if cfg.adapter:
        model = with_adapter(model, cfg.adapter)
    return _finish(model, cfg, trainable)


def _finish(model: PreTrainedModel, cfg: ModelConfig, trainable: bool) -> PreTrainedModel:
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
    student_cfg: ModelConfig, teacher_cfg: Optional[ModelConfig], cross: bool = False
) -> Tuple[PreTrainedModel, Optional[PreTrainedModel], PreTrainedTokenizerBase, int]:
    """Student (trainable), frozen teacher (or None), the student's tokenizer and its true vocab size; the
    teacher's tokenizer must be the same unless ``cross`` (distillation across vocabularies)."""
    tok = load_tokenizer(student_cfg)
    student = load_model(student_cfg, tok)
    if student_cfg.lora.r:
        student = add_lora(student, student_cfg.lora, student_cfg.name)
    teacher = None
    vocab = len(tok)
    if teacher_cfg is not None:
        t_tok = load_tokenizer(teacher_cfg)
        vocab = vocab if cross else check_compatible(tok, t_tok)
        teacher = load_model(teacher_cfg, t_tok, trainable=False)
    return student, teacher, tok, vocab


def drop_layers(src: str, keep: Sequence[int], dst: Path) -> Path:
    """A smaller student initialised from a model: only its decoder blocks ``keep`` (in order),
    everything else copied (DistilBERT's initialisation); see :mod:`switchkd.shrink`.  Saves model and
    tokenizer to ``dst`` (which must not hold files) and returns it."""
    from switchkd.shrink import shrink

    try:
        return shrink(src, dst, keep=list(keep))[0]
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def saved_parameters(directory: str | Path) -> Optional[int]:
    """The number of parameters in a saved model directory's safetensors files (tied weights stored once, counted
    once), read from the files' headers; None when it has none."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total
