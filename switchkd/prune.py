"""``switchkd prune``: Minitron-style structured pruning of a teacher into a student initialisation.

Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation" (arXiv 2407.14679),
as NVIDIA ModelOpt's ``mcore_minitron`` mode computes it (``modelopt/torch/nas/plugins/megatron.py``):

- **importance from activations** on calibration text: for each channel, the mean of ``|activation|`` over an
  example's (unpadded) positions, then the L2 norm over examples.  An MLP neuron is scored at ``down_proj``'s input
  (GPT-2: ``mlp.c_proj``'s), an attention head by the L2 norm of its ``head_dim`` slice of ``o_proj``'s input, a
  hidden (embedding) channel by the sum over every decoder block's two norms of their outputs' scores;
- **depth by Block Influence** (ShortGPT, Men et al. 2024): a block's mean over tokens of
  ``1 - cos(input, output)``; the blocks with the highest influence are kept, in order;
- **one pass**: the importance is measured once on the whole model, then hidden channels, heads (the same number
  kept in every key/value group, so grouped-query attention keeps its groups), MLP neurons and blocks are cut.

Kept units keep their original order, so keeping every unit is the identity.  Each norm's weight is multiplied by
``sqrt(H / H')`` when the hidden size goes from ``H`` to ``H'``: RMSNorm then normalises every kept channel exactly as
before when the pruned channels carry no activation (ModelOpt slices the weight only; this keeps the kept
channels' scale).  Llama-family models (Llama, Mistral, Qwen2, SmolLM: ``model.layers.N`` with ``q/k/v/o_proj``
and a gated MLP) take every option; GPT-2 takes ``--mlp`` and ``--layers`` (its attention width is tied to its
hidden size).  The output is a plain Hugging Face directory (safetensors, config with ``head_dim``, tokenizer with
its chat template); tied embeddings stay tied.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from switchkd.sections import ConfigError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
BLOCK = re.compile(r"\.(h|layers)\.(\d+)\.")  # a decoder block's parameter names
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per decoder block
GPT2_TYPES = ("gpt2",)


@dataclass(frozen=True)
class Shape:
    """The student's size: every field ``None`` keeps the teacher's."""

    hidden: Optional[int] = None
    mlp: Optional[int] = None
    heads_per_group: Optional[int] = None
    layers: Optional[int] = None


@dataclass
class Sizes:
    """A model's prunable sizes, read from its config."""

    family: str  # "llama" or "gpt2"
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


def sizes_of(config: Any) -> Sizes:
    """The prunable sizes of a transformers config; a one-line error for an architecture prune does not know."""
    kind = getattr(config, "model_type", None)
    if kind in LLAMA_TYPES:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return Sizes("llama", int(config.hidden_size), int(config.intermediate_size), heads,
                     int(getattr(config, "num_key_value_heads", None) or heads), head_dim, int(config.num_hidden_layers))
    if kind in GPT2_TYPES:
        mlp = int(config.n_inner or 4 * config.n_embd)
        return Sizes("gpt2", int(config.n_embd), mlp, int(config.n_head), int(config.n_head),
                     int(config.n_embd) // int(config.n_head), int(config.n_layer))
    known = ", ".join(LLAMA_TYPES + GPT2_TYPES)
    raise ConfigError(f"prune: model_type {kind!r} is not supported (supported: {known})")


def check_shape(shape: Shape, sizes: Sizes) -> Shape:
    """``shape`` with the teacher's size filled in where it is ``None``; one-line errors for sizes above the
    teacher's, below 1, or options the architecture cannot take."""
    full = Shape(shape.hidden or sizes.hidden, shape.mlp or sizes.mlp, shape.heads_per_group or sizes.heads_per_group,
                 shape.layers or sizes.layers)
    limits = (("--hidden", full.hidden, sizes.hidden), ("--mlp", full.mlp, sizes.mlp),
              ("--heads-per-group", full.heads_per_group, sizes.heads_per_group), ("--layers", full.layers, sizes.layers))
    for flag, value, most in limits:
        if not 1 <= value <= most:
            extra = (f" ({sizes.heads} query heads in {sizes.kv_heads} key/value groups)"
                     if flag == "--heads-per-group" else "")
            raise ConfigError(f"prune: {flag} {value}: expected 1..{most}, the teacher's size{extra}")
    heads = sizes.kv_heads * full.heads_per_group
    if sizes.family == "llama" and full.hidden % heads:
        low, high = full.hidden - full.hidden % heads, full.hidden - full.hidden % heads + heads
        raise ConfigError(f"prune: --hidden {full.hidden} with {heads} query heads: transformers' config needs the "
                          f"hidden size to be a multiple of the query heads (e.g. {low or heads} or {high})")
    if sizes.family == "gpt2" and (full.hidden != sizes.hidden or full.heads_per_group != sizes.heads_per_group):
        raise ConfigError("prune: GPT-2 takes --mlp and --layers only (its attention width is its hidden size, "
                          "one query head per key/value head)")
    return full


@dataclass
class Importance:
    """Activation importance of a model's units (float64).

    Attributes:
        hidden: ``[H]`` hidden channels, summed over every block's two norms.
        mlp: ``[L, I]`` MLP neurons per block.
        heads: ``[L, n_heads]`` query heads per block.
        blocks: ``[L]`` Block Influence, mean over tokens of ``1 - cos(block input, block output)``.
        examples: how many examples were measured.
    """

    hidden: Tensor
    mlp: Tensor
    heads: Tensor
    blocks: Tensor
    examples: int


def _blocks(model: Any, family: str) -> List[Any]:
    return list(model.model.layers if family == "llama" else model.transformer.h)


def _parts(block: Any, family: str) -> Dict[str, Any]:
    """A block's modules whose activations are scored: the two norms, the MLP's down projection, the attention's
    output projection."""
    if family == "llama":
        return {"norms": [block.input_layernorm, block.post_attention_layernorm], "down": block.mlp.down_proj,
                "out": block.self_attn.o_proj}
    return {"norms": [block.ln_1, block.ln_2], "down": block.mlp.c_proj, "out": block.attn.c_proj}


class _Meter:
    """Forward hooks accumulating the per-example sums behind :class:`Importance` (see the module docstring)."""

    def __init__(self, model: Any, sizes: Sizes) -> None:
        L, H = sizes.layers, sizes.hidden
        self.sizes, self.mask = sizes, None
        self.hidden = torch.zeros(2 * L, H, dtype=torch.float64)
        self.mlp = torch.zeros(L, sizes.mlp, dtype=torch.float64)
        self.attn = torch.zeros(L, sizes.heads * sizes.head_dim, dtype=torch.float64)
        self.influence = torch.zeros(L, dtype=torch.float64)
        self.tokens = 0.0
        self.handles = []
        for i, block in enumerate(_blocks(model, sizes.family)):
            parts = _parts(block, sizes.family)
            for j, norm in enumerate(parts["norms"]):
                self.handles.append(norm.register_forward_hook(self._output_hook(self.hidden, 2 * i + j)))
            self.handles.append(parts["down"].register_forward_pre_hook(self._input_hook(self.mlp, i)))
            self.handles.append(parts["out"].register_forward_pre_hook(self._input_hook(self.attn, i)))
            self.handles.append(block.register_forward_hook(self._block_hook(i), with_kwargs=True))

    def _accumulate(self, into: Tensor, row: int, x: Tensor) -> None:
        """``into[row] += sum over examples of (mean over real positions of |x|)^2`` for ``x [B, T, C]``."""
        m = self.mask.to(torch.float64)
        mean = (x.detach().double().abs() * m[..., None]).sum(1) / m.sum(1).clamp(min=1)[:, None]  # [B, C]
        into[row] += mean.pow(2).sum(0)

    def _output_hook(self, into: Tensor, row: int) -> Callable:
        return lambda module, args, output: self._accumulate(into, row, output)

    def _input_hook(self, into: Tensor, row: int) -> Callable:
        return lambda module, args: self._accumulate(into, row, args[0])

    def _block_hook(self, row: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x.detach().double(), y.detach().double(), dim=-1)  # [B, T]
            m = self.mask.to(torch.float64)
            self.influence[row] += ((1 - cos) * m).sum()
            if row == 0:
                self.tokens += float(m.sum())
        return hook

    def close(self, examples: int) -> Importance:
        for h in self.handles:
            h.remove()
        s = self.sizes
        attn = self.attn.sqrt().view(s.layers, s.heads, s.head_dim)
        return Importance(hidden=self.hidden.sqrt().sum(0), mlp=self.mlp.sqrt(),
                          heads=torch.linalg.vector_norm(attn, ord=2, dim=-1),
                          blocks=self.influence / max(self.tokens, 1.0), examples=examples)


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists right-padded into ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def importance(model: Any, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8,
               progress: bool = False) -> Importance:
    """Measure :class:`Importance` of ``model`` on ``sequences`` (token lists, right-padded in batches; padding
    masked out of every mean).

    Args:
        model: a Llama-family or GPT-2 causal LM (eval mode is set here).
        sequences: calibration token lists.
        pad_id: the padding token id.
        batch_size: sequences per forward.
        progress: show a tqdm bar.
    """
    sizes = sizes_of(model.config)
    if not sequences:
        raise ConfigError("prune: no calibration sequences")
    model.eval()
    meter = _Meter(model, sizes)
    from tqdm import tqdm

    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="importance", disable=not progress):
            ids, mask = right_padded(sequences[start:start + batch_size], pad_id)
            meter.mask = mask
            model(input_ids=ids, attention_mask=mask)
    finally:
        result = meter.close(len(sequences))
    return result


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores``, in increasing index order (ties: the lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def _head_rows(scores: Tensor, sizes: Sizes, per_group: int) -> Tensor:
    """The kept query heads' rows of ``q_proj`` (``[kept heads x head_dim]``): the ``per_group`` most important
    heads of every key/value group (heads ``g * G .. g * G + G - 1`` share group ``g``, as transformers' GQA
    repeats key/value heads)."""
    G = sizes.heads_per_group
    heads = torch.cat([g * G + _top(scores[g * G:(g + 1) * G], per_group) for g in range(sizes.kv_heads)])
    return (heads[:, None] * sizes.head_dim + torch.arange(sizes.head_dim)[None, :]).flatten()


@dataclass
class Plan:
    """Which units a pruned model keeps: ``hidden [H']``, per kept block ``mlp [I']`` and ``q_rows``, ``blocks``."""

    hidden: Tensor
    blocks: List[int]
    mlp: Dict[int, Tensor]
    q_rows: Dict[int, Tensor]


def plan(imp: Importance, sizes: Sizes, shape: Shape) -> Plan:
    """The units to keep for ``shape`` (checked by :func:`check_shape`) by importance ``imp``."""
    blocks = _top(imp.blocks, shape.layers).tolist()
    return Plan(hidden=_top(imp.hidden, shape.hidden), blocks=blocks,
                mlp={b: _top(imp.mlp[b], shape.mlp) for b in blocks},
                q_rows={b: _head_rows(imp.heads[b], sizes, shape.heads_per_group) for b in blocks})


def _llama_slices(suffix: str, plan_: Plan, block: int) -> Optional[tuple]:
    """``(rows, cols)`` index tensors (None: keep all) of a Llama-family block tensor named ``suffix``."""
    hidden, q, mlp = plan_.hidden, plan_.q_rows[block], plan_.mlp[block]
    table = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (None, hidden), "self_attn.v_proj.weight": (None, hidden),
        "self_attn.k_proj.bias": (None,), "self_attn.v_proj.bias": (None,),
        "self_attn.o_proj.weight": (hidden, q), "self_attn.o_proj.bias": (hidden,),
        "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
        "mlp.gate_proj.bias": (mlp,), "mlp.up_proj.bias": (mlp,),
        "mlp.down_proj.weight": (hidden, mlp), "mlp.down_proj.bias": (hidden,),
        "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),
    }
    return table.get(suffix)


def _gpt2_slices(suffix: str, plan_: Plan, block: int) -> Optional[tuple]:
    """``(rows, cols)`` of a GPT-2 block tensor (Conv1D weights are ``[in, out]``); only the MLP is cut."""
    mlp = plan_.mlp[block]
    table = {"mlp.c_fc.weight": (None, mlp), "mlp.c_fc.bias": (mlp,), "mlp.c_proj.weight": (mlp, None)}
    return table.get(suffix, (None, None))


def _take(tensor: Tensor, index: tuple) -> Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor.clone()


NORM_SUFFIXES = ("layernorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")


def pruned_state(state: Dict[str, Tensor], sizes: Sizes, plan_: Plan) -> Dict[str, Tensor]:
    """The student's state dict: blocks renumbered, every tensor sliced by ``plan_``, norms rescaled."""
    index = {b: i for i, b in enumerate(plan_.blocks)}
    slices = _llama_slices if sizes.family == "llama" else _gpt2_slices
    scale = math.sqrt(sizes.hidden / len(plan_.hidden))
    out = {}
    for key, value in state.items():
        m = BLOCK.search(key)
        if m is None:
            new_key, cut = key, _outer_slice(key, value, sizes, plan_)
        else:
            block = int(m.group(2))
            if block not in index:
                continue
            suffix = key[m.end():]
            cut = slices(suffix, plan_, block)
            if cut is None:
                raise ConfigError(f"prune: does not know how to cut the block tensor {suffix!r}")
            new_key = key[:m.start()] + f".{m.group(1)}.{index[block]}." + suffix
        tensor = _take(value, cut)
        if key.endswith(NORM_SUFFIXES) and "q_norm" not in key and "k_norm" not in key and scale != 1.0:
            tensor = tensor * scale
        out[new_key] = tensor
    return out


def _outer_slice(key: str, value: Tensor, sizes: Sizes, plan_: Plan) -> tuple:
    """Embeddings, final norm and LM head: their hidden dimension (the last one, ``[V, H]`` / ``[H]``) cut."""
    if sizes.family == "gpt2" or value.shape[-1] != sizes.hidden:
        return (None,) * value.dim()
    return (None,) * (value.dim() - 1) + (plan_.hidden,)


def pruned_config(config: Any, sizes: Sizes, shape: Shape, blocks: Sequence[int]) -> Any:
    """The student's config: sizes, ``head_dim`` written out, per-block lists cut to ``blocks``."""
    config = copy.deepcopy(config)
    if sizes.family == "llama":
        config.hidden_size = shape.hidden
        config.intermediate_size = shape.mlp
        config.num_attention_heads = sizes.kv_heads * shape.heads_per_group
        config.num_key_value_heads = sizes.kv_heads
        config.head_dim = sizes.head_dim
        config.num_hidden_layers = shape.layers
    else:
        config.n_inner = shape.mlp
        config.n_layer = shape.layers
    for attr in PER_LAYER_CONFIG:
        value = getattr(config, attr, None)
        if isinstance(value, list) and len(value) == sizes.layers:
            setattr(config, attr, [value[i] for i in blocks])
    return config


def prune_model(model: Any, imp: Importance, shape: Shape) -> Any:
    """A new model of ``model``'s class cut to ``shape`` by ``imp`` (same dtype, eval mode)."""
    sizes = sizes_of(model.config)
    full = check_shape(shape, sizes)
    keep = plan(imp, sizes, full)
    config = pruned_config(model.config, sizes, full, keep.blocks)
    student = type(model)(config).to(next(model.parameters()).dtype)
    missing, unexpected = student.load_state_dict(pruned_state(model.state_dict(), sizes, keep), strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise ConfigError(f"{type(model).__name__}: cannot prune (unmatched weights {sorted(missing)[:3]} "
                          f"{sorted(unexpected)[:3]})")
    student.tie_weights()
    return student.eval()


def calibration_sequences(data: str, tokenizer: Any, samples: int, max_length: int) -> List[List[int]]:
    """Up to ``samples`` calibration token lists (prompt + response) from ``data`` in any format ``switchkd.data``
    reads, the tokenizer's chat template applied when it has one (else the Alpaca template)."""
    from switchkd.data import load_examples, tokenize
    from switchkd.sections import DataConfig

    examples = load_examples(data, DataConfig(template="auto"), tokenizer, samples)
    items, _ = tokenize(examples, tokenizer, max(1, max_length // 2), max_length)
    sequences = [x.prompt + x.response for x in items if x.prompt or x.response]
    if not sequences:
        raise ConfigError(f"{data}: no calibration text after tokenization")
    return sequences


def parameters(model: Any) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
