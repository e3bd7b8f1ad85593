"""``switchkd convert llama2c``: a llama2.c checkpoint and tokenizer -> a Hugging Face Llama directory.

Weights: llama2.c's "legacy" float32 layout (header of 7 int32, then the tensors in a fixed
order).  llama2.c rotates interleaved pairs of each head's dimensions while Hugging Face's
Llama rotates halves, so the rows of wq and wk are permuted per head (as transformers' own
Llama conversion does).  Tokenizer: the scored pieces become a SentencePiece-style BPE
(``tokenizers``) whose merges are ranked by the merged piece's score, with byte fallback.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchkd.sections import ConfigError

SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rotary layout -> rotate-half layout, per head; ``[out, in]``."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def read_llama2c(path: str | Path) -> Tuple[LlamaConfig, dict]:
    """Config and a Hugging Face Llama state dict from a llama2.c ``.bin`` checkpoint."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    raw = Path(path).read_bytes()
    if (len(raw) - 28) % 4:
        raise ConfigError(f"{path}: {len(raw)} bytes is not a 28-byte header plus float32 values")
    if len(raw) < 28:
        raise ConfigError(f"{path}: too short for a llama2.c header (7 int32)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise ConfigError(f"{path}: implausible llama2.c header {dim, hidden, layers, heads, kv_heads, vocab, seq_len}")
    kv_dim, head = dim * kv_heads // heads, dim // heads
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    shapes = [("emb", (vocab, dim)), ("att_norm", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("ffn_norm", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("norm", (dim,)), ("rope", (2, seq_len, head // 2))]
    if not shared:
        shapes.append(("cls", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    if data.size != need:
        raise ConfigError(f"{path}: expected {need} float32 values after the header, found {data.size}")
    t, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        t[name] = torch.from_numpy(data[off:off + n].copy()).view(shape)
        off += n
    sd = {"model.embed_tokens.weight": t["emb"], "model.norm.weight": t["norm"],
          "lm_head.weight": t["emb"] if shared else t["cls"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": _permute(t["wq"][i], heads),
               p + "self_attn.k_proj.weight": _permute(t["wk"][i], kv_heads),
               p + "self_attn.v_proj.weight": t["wv"][i], p + "self_attn.o_proj.weight": t["wo"][i],
               p + "mlp.gate_proj.weight": t["w1"][i], p + "mlp.down_proj.weight": t["w2"][i],
               p + "mlp.up_proj.weight": t["w3"][i], p + "input_layernorm.weight": t["att_norm"][i],
               p + "post_attention_layernorm.weight": t["ffn_norm"][i]}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared, bos_token_id=1,
                      eos_token_id=2, pad_token_id=None)
    return cfg, sd


def read_llama2c_tokenizer(path: str | Path) -> List[Tuple[str, float]]:
    """``[(piece, score)]`` from a llama2.c ``tokenizer.bin``, spaces written as SentencePiece's ``▁``."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    raw = Path(path).read_bytes()
    pieces, off = [], 4
    try:
        while off < len(raw):
            score, n = struct.unpack("<fi", raw[off:off + 8])
            text = raw[off + 8:off + 8 + n].decode("utf-8")
            if n < 0 or off + 8 + n > len(raw):
                raise ValueError
            pieces.append((SPECIAL.get(len(pieces), text.replace(" ", "▁")), score))
            off += 8 + n
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a llama2.c tokenizer (bad record {len(pieces)} at byte {off})") from None
    if len(pieces) < 259:
        raise ConfigError(f"{path}: {len(pieces)} tokens; a llama2.c tokenizer has <unk>, <s>, </s> and 256 bytes first")
    return pieces


def build_tokenizer(pieces: List[Tuple[str, float]]) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: merges ranked by the merged piece's score, byte fallback, BOS added."""
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    ranked = sorted(range(len(pieces)), key=lambda i: -pieces[i][1])
    merges = []
    for i in ranked:
        piece = pieces[i][0]
        if i < 259 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((vocab[left], vocab[right], left, right))
    ordered = []
    for i in ranked:  # all splits of a piece share its rank; ties by the parts' ids
        piece = pieces[i][0]
        ordered += sorted((m for m in merges if m[2] + m[3] == piece), key=lambda m: (m[0], m[1]))
    tk = Tokenizer(BPE(vocab=vocab, merges=[(m[2], m[3]) for m in ordered], unk_token="<unk>", byte_fallback=True,
                       fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok


def convert_llama2c(model_bin: str | Path, tokenizer_bin: str | Path, out_dir: str | Path) -> Path:
    """Write a ``save_pretrained`` Llama model and tokenizer to ``out_dir`` (which must not exist, or be an
    empty directory), through a temporary directory renamed when complete; returns it."""
    from switchkd.rundir import check_output_path

    out = check_output_path(out_dir, "OUT_DIR", "dir", [model_bin, tokenizer_bin])  # before anything is read
    cfg, sd = read_llama2c(model_bin)
    pieces = read_llama2c_tokenizer(tokenizer_bin)
    if len(pieces) != cfg.vocab_size:
        raise ConfigError(f"{tokenizer_bin}: {len(pieces)} tokens but {model_bin} has vocab_size {cfg.vocab_size}")
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConfigError(f"{model_bin}: weights do not fit a Llama ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    from switchkd.rundir import write_new_dir

    return write_new_dir(out, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                           build_tokenizer(pieces).save_pretrained(tmp)))
