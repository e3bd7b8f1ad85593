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
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from switchkd.config import ConfigError
from switchkd.rundir import write_new_dir

BLOCK = re.compile(r"\.(h|layers)\.(\d+)\.")
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per decoder block


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
           keep: Optional[Sequence[int]] = None) -> tuple[Path, List[int]]:
    """Cut ``src`` (a model directory or hub id) to ``layers`` evenly spaced blocks or to the blocks
    ``keep``; write model and tokenizer to ``out_dir`` (new or empty), renamed into place when complete.
    Returns ``(out_dir, kept block indices)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (layers is None) == (keep is None):
        raise ConfigError("shrink: give exactly one of --layers N or --keep I,J,...")
    from switchkd.rundir import check_output_path

    out = check_output_path(out_dir, "OUT_DIR", "dir", [src])  # before anything is read
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        total = int(AutoConfig.from_pretrained(str(src)).num_hidden_layers)
        keep = even_layers(total, layers) if layers is not None else list(keep or [])
        check_keep(keep, total)  # before the weights load
        teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
        tok = AutoTokenizer.from_pretrained(str(src))
    except ConfigError:
        raise
    except Exception as exc:  # not a model directory, corrupt safetensors, unknown architecture
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"{src}: cannot load as a causal LM ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    student = cut(teacher, keep)
    write_new_dir(out, lambda tmp: (student.save_pretrained(tmp, safe_serialization=True), tok.save_pretrained(tmp)))
    return out, keep
