"""``switchkd shrink``: a depth-pruned student initialisation cut from a teacher.

The student keeps a subset of the teacher's decoder blocks (in order) and everything else
(embeddings, final norm, LM head, tokenizer with its chat template): DistilBERT's initialisation
(Sanh et al., 2019, every other layer) and Minitron's depth pruning (Muralidharan et al., 2024).
``--layers N`` keeps N evenly spaced blocks with the first and the last among them.  Works for
models whose decoder blocks are numbered ``.h.N.`` (GPT-2 family) or ``.layers.N.`` (Llama,
Mistral, Qwen, SmolLM, ... including tied embeddings and grouped-query attention).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from switchkd.prune import BLOCK, PER_LAYER_CONFIG
from switchkd.rundir import write_new_dir
from switchkd.sections import ConfigError


def even_layers(total: int, n: int) -> List[int]:
    """``n`` block indices in ``0..total-1``, evenly spaced, first and last included (n >= 2)."""
    if not 1 <= n <= total:
        raise ConfigError(f"--layers {n}: expected 1..{total} (the model has {total} decoder blocks)")
    if n == 1:
        return [0]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def parse_keep(text: str) -> List[int]:
    """``"0,3,7"`` -> ``[0, 3, 7]``; a one-line error on anything else."""
    try:
        keep = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--keep {text!r}: expected comma-separated block indices, e.g. 0,3,7") from None
    if not keep:
        raise ConfigError(f"--keep {text!r}: expected at least one block index")
    return keep


def check_keep(keep: Sequence[int], total: int) -> None:
    """Indices in range, unique and increasing."""
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ConfigError(f"--keep {','.join(map(str, keep))}: blocks {bad} are outside 0..{total - 1}")
    if list(keep) != sorted(set(keep)):
        raise ConfigError(f"--keep {','.join(map(str, keep))}: indices must be distinct and increasing")


def kept_state(state: Dict[str, Any], keep: Sequence[int]) -> Dict[str, Any]:
    """The state dict with only blocks ``keep``, renumbered 0..len(keep)-1; other tensors copied."""
    index = {b: i for i, b in enumerate(keep)}
    out = {}
    for key, value in state.items():
        m = BLOCK.search(key)
        if m is None:
            out[key] = value
        elif int(m.group(2)) in index:
            out[key[:m.start()] + f".{m.group(1)}.{index[int(m.group(2))]}." + key[m.end():]] = value
    return out


def torch_top(scores: Any, k: int) -> List[int]:
    """Indices of the ``k`` highest ``scores`` (ties: the lower index)."""
    import torch

    return torch.argsort(-scores, stable=True)[:k].tolist()


def cut(teacher: Any, keep: Sequence[int]) -> Any:
    """A model of ``teacher``'s class with only its blocks ``keep`` (same dtype), weights copied."""
    state = teacher.state_dict()
    if not any(BLOCK.search(k) for k in state):
        raise ConfigError(f"{type(teacher).__name__}: no decoder blocks named '.h.N.' or '.layers.N.'; "
                          "shrink supports GPT-2- and Llama-style layouts")
    total = teacher.config.num_hidden_layers
    check_keep(keep, total)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    for attr in PER_LAYER_CONFIG:
        value = getattr(config, attr, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, attr, [value[i] for i in keep])
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(kept_state(state, keep), strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(f"{type(teacher).__name__}: cannot cut (unmatched weights {sorted(missing)[:3]} "
                          f"{sorted(unexpected)[:3]})")
    student.tie_weights()
    return student.eval()


def shrink(src: str | Path, out_dir: str | Path, layers: Optional[int] = None,
           keep: Optional[Sequence[int]] = None, data: Optional[str] = None,
           samples: int = 128) -> tuple[Path, List[int]]:
    """Cut ``src`` (a model directory or hub id) to ``layers`` blocks — those with the highest Block Influence on
    ``samples`` examples of ``data`` (:mod:`switchkd.prune`), or evenly spaced without ``data`` — or to the blocks
    ``keep``; write model and tokenizer to ``out_dir`` (new or empty), renamed into place when complete.
    Returns ``(out_dir, kept block indices)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (layers is None) == (keep is None):
        raise ConfigError("shrink: give exactly one of --layers N or --keep I,J,...")
    from switchkd.rundir import check_output_path

    if data is not None and keep is not None:
        raise ConfigError("shrink: --data chooses blocks by Block Influence; --keep names them: give one")
    out = check_output_path(out_dir, "OUT_DIR", "dir", [src, data])  # before anything is read
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(src))
        total = int(config.num_hidden_layers)
        if data is not None:
            from switchkd.prune import sizes_of

            sizes_of(config)  # Block Influence is measured on the architectures prune knows
        keep = even_layers(total, layers) if layers is not None else list(keep or [])
        check_keep(keep, total)  # before the weights load
        tok = AutoTokenizer.from_pretrained(str(src))
        sequences = None
        if data is not None:
            from switchkd.prune import calibration_sequences

            sequences = calibration_sequences(data, tok, samples, 512)  # its mistakes before the weights load
        teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    except ConfigError:
        raise
    except Exception as exc:  # not a model directory, corrupt safetensors, unknown architecture
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"{src}: cannot load as a causal LM ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if sequences is not None:
        from switchkd.prune import importance

        influence = importance(teacher, sequences, tok.pad_token_id if tok.pad_token_id is not None else 0).blocks
        keep = sorted(torch_top(influence, len(keep)))
    student = cut(teacher, keep)
    write_new_dir(out, lambda tmp: (student.save_pretrained(tmp, safe_serialization=True), tok.save_pretrained(tmp)))
    return out, keep
