"""``switchkd prune``: measure a teacher's importance on calibration data, cut it to a shape (or the shape
``--params`` chooses, :mod:`switchkd.prune_shapes`), write the student as a plain Hugging Face directory
(the pruning itself: :mod:`switchkd.prune`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from switchkd.prune import (
    Shape,
    calibration_sequences,
    check_shape,
    importance,
    parameters,
    plan,
    prune_model,
    sizes_of,
)
from switchkd.prune_shapes import choose_shape, shapes_for
from switchkd.sections import ConfigError


def prune(teacher: str | Path, out_dir: str | Path, shape: Shape, data: str, samples: int = 1024,
          batch_size: int = 8, max_length: int = 512, progress: bool = True,
          params: Optional[int] = None) -> Dict[str, Any]:
    """``switchkd prune``: measure importance on ``data``, cut ``teacher`` to ``shape``, write the student to
    ``out_dir`` (new or empty; renamed into place when complete).  Everything a user can get wrong is checked before
    the weights load.  With ``params`` the shape is chosen by :func:`choose_shape` (importance from ``samples``
    examples, the cross-entropy on up to 64 further ones).  Returns a summary (kept blocks, sizes, parameter counts,
    output path, the candidates when ``params`` chose)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from switchkd.rundir import check_output_path, write_new_dir

    out = check_output_path(out_dir, "OUT_DIR", "dir", [teacher, data])
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(teacher))
    except Exception as exc:  # not a model directory, unreadable config
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{teacher}: cannot load a model config ({first})") from None
    sizes = sizes_of(config)
    full = check_shape(shape, sizes)
    shapes = shapes_for(sizes, config, params) if params else []
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    except Exception as exc:
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"{teacher}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    sequences = calibration_sequences(data, tokenizer, samples + (64 if params else 0), max_length)
    held_out: List[List[int]] = []
    if params:
        if len(sequences) < 2:
            raise ConfigError(f"{data}: --params needs at least 2 calibration examples (one to measure, one to rank)")
        cut_at = min(samples, len(sequences) - max(1, min(64, len(sequences) // 4)))
        sequences, held_out = sequences[:cut_at], sequences[cut_at:]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype="auto")
    except Exception as exc:
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"{teacher}: cannot load as a causal LM ({str(exc).splitlines()[0]})") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    imp = importance(model, sequences, pad, batch_size, progress=progress)
    table = None
    if params:
        full, table = choose_shape(model, imp, shapes, held_out, pad)
    student = prune_model(model, imp, full)
    write_new_dir(out, lambda tmp: (student.save_pretrained(tmp, safe_serialization=True), tokenizer.save_pretrained(tmp)))
    return {"out": out, "blocks": list(plan(imp, sizes, full).blocks), "shape": full, "examples": len(sequences),
            "parameters": parameters(student), "teacher_parameters": parameters(model),
            "block_influence": [round(float(x), 4) for x in imp.blocks], "candidates": table}
