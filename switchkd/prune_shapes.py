"""``switchkd prune --params N``: the shapes of a small width/depth grid near a parameter budget, their exact
parameter counts (from the config, before any weights load), and the choice among them by the held-out
cross-entropy of each pruned model (:mod:`switchkd.prune` cuts them)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

import torch

from switchkd.prune import Importance, Shape, Sizes, check_shape, prune_model, right_padded, sizes_of
from switchkd.sections import ConfigError


def parameter_count(sizes: Sizes, shape: Shape, config: Any) -> int:
    """Parameters of a model of ``config``'s architecture cut to ``shape`` (tied embeddings counted once; biases
    as the config declares them)."""
    vocab = int(config.vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    h, m, L = shape.hidden, shape.mlp, shape.layers
    if sizes.family == "gpt2":
        positions = int(config.n_positions)
        block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h)
        return vocab * h + positions * h + L * block + 2 * h + (0 if tied else vocab * h)
    q, kv = sizes.kv_heads * shape.heads_per_group * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    attn_bias = bool(getattr(config, "attention_bias", False)) or getattr(config, "model_type", "") == "qwen2"
    block = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * m
    block += (q + 2 * kv) * int(attn_bias) + h * int(bool(getattr(config, "attention_bias", False)))
    block += (2 * m + h) * int(bool(getattr(config, "mlp_bias", False)))
    return vocab * h * (1 if tied else 2) + L * block + h


def shapes_near(sizes: Sizes, config: Any, target: int, tolerance: float = 0.05, most: int = 6) -> List[Shape]:
    """Up to ``most`` shapes whose parameter count is within ``tolerance`` of ``target``, closest first, from a grid:
    hidden x {1, 7/8, 3/4, 5/8, 1/2} (a multiple of the query heads and of 8), MLP x {1, 3/4, 5/8, 1/2, 3/8, 1/4},
    every heads-per-group, blocks x {1, 13/15, 11/15, 3/5, 1/2} (Llama family; GPT-2: MLP and blocks)."""
    fractions = (1, 7 / 8, 3 / 4, 5 / 8, 1 / 2)
    groups = range(sizes.heads_per_group, 0, -1) if sizes.family == "llama" else (sizes.heads_per_group,)
    found = {}
    for g in groups:
        step = math.lcm(sizes.kv_heads * g, 8)
        hiddens = ({max(step, int(sizes.hidden * f) // step * step) for f in fractions} if sizes.family == "llama"
                   else {sizes.hidden})
        for h in hiddens:
            for fm in (1, 3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4):
                for fl in (1, 13 / 15, 11 / 15, 3 / 5, 1 / 2):
                    shape = Shape(h, max(8, int(sizes.mlp * fm) // 8 * 8), g, max(1, round(sizes.layers * fl)))
                    n = parameter_count(sizes, shape, config)
                    if abs(n - target) <= tolerance * target:
                        found[shape] = n
    return sorted(found, key=lambda x: (abs(found[x] - target), -x.layers))[:most]


@torch.no_grad()
def cross_entropy(model: Any, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on ``sequences``."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids, mask = right_padded(sequences[start:start + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum",
                                                         ignore_index=-100))
        count += int((target != -100).sum())
    return total / max(count, 1)


def shapes_for(sizes: Sizes, config: Any, target: int) -> List[Shape]:
    """:func:`shapes_near` ``target``, or a one-line error when the grid has none (checked before weights load)."""
    shapes = shapes_near(sizes, config, target)
    if not shapes:
        full = parameter_count(sizes, check_shape(Shape(), sizes), config)
        raise ConfigError(f"prune: --params {target}: no shape of the grid within 5% (the teacher has {full}); give "
                          "the sizes instead")
    return shapes


def choose_shape(model: Any, imp: Importance, shapes: Sequence[Shape], held_out: Sequence[Sequence[int]],
                 pad_id: int, log: Callable[[str], None] = print) -> tuple[Shape, List[Dict[str, Any]]]:
    """Of ``shapes`` (:func:`shapes_for`), the one whose pruned model has the lowest cross-entropy on ``held_out``
    (untrained; bench/prune.py measures whether healing keeps the ranking).  Returns ``(shape, table)``."""
    sizes = sizes_of(model.config)
    table = []
    for shape in shapes:
        held_out_ce = cross_entropy(prune_model(model, imp, shape), held_out, pad_id)
        table.append({"shape": shape, "parameters": parameter_count(sizes, shape, model.config),
                      "cross_entropy": held_out_ce})
        log(f"  hidden {shape.hidden}, MLP {shape.mlp}, {shape.heads_per_group} heads per group, {shape.layers} blocks: "
            f"{table[-1]['parameters'] / 1e6:.1f}M parameters, held-out CE {held_out_ce:.3f}")
    best = min(table, key=lambda r: r["cross_entropy"])
    return best["shape"], table


def parse_count(text: str) -> int:
    """``"60M"`` -> 60_000_000 (suffixes K, M, B; a plain integer too); argparse raises on anything else."""
    import argparse

    scale = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 60M or 60000000, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a parameter count >= 1, got {text!r}")
    return int(value)
