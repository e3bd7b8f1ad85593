"""Decoding state shared by every decode loop: the engine's settings, cache steppers, the sampler and the output
buffers (who writes each token: :mod:`switchkd.rules`).

A :class:`Stepper` holds one model's KV cache and a 2-D attention mask that may have *holes*:
columns written for tokens a row later rejected are masked out instead of cropped, and each row
keeps its own next position (``position_ids`` are explicit), so rows of one batch can accept
different numbers of tokens per block.  The cache is transformers' ``DynamicCache`` (eager) or,
with ``static=True``, a preallocated ``StaticCache`` whose one-token decode step may be compiled
(``torch.compile``; ``mode="reduce-overhead"`` = CUDA graphs on CUDA).  Prefill is always eager.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from switchkd.distributed import all_ranks
from switchkd.divergences import GATES  # noqa: F401  (re-exported: the engine's public names)
from switchkd.losses import accepts_logits_to_keep
from switchkd.rules import mix_logprobs  # noqa: F401
from switchkd.sections import DecodingConfig


@dataclass
class RolloutConfig(DecodingConfig):
    """How to decode: the :class:`~switchkd.sections.DecodingConfig` sampling fields plus the engine's settings.
    Who writes each token is the loop's :class:`~switchkd.rules.Rule`, not a setting here."""

    max_new_tokens: int = 64
    seed: Optional[int] = None  # None: the global torch RNG
    eos_token_id: Optional[int | Sequence[int]] = None  # default: the model config's
    pad_token_id: Optional[int] = None  # default: the model config's, else EOS
    vocab_size: Optional[int] = None  # true vocabulary (logits beyond it are ignored)
    keep_teacher_logits: bool = False  # return the teacher's next-token logits per step
    speculative: bool = True  # a verifiable rule: student drafts, teacher verifies a block per forward
    draft_k: int = 4  # first draft length; then chosen from the recent rejection rate (speculative.next_k)
    max_draft_k: int = 16
    adapt_k: bool = True  # speculative: choose each block's k from the rejection rate (False: always draft_k)
    teacher_cost: Optional[float] = None  # teacher forward cost / student's; default: layer-count ratio
    compile: Union[bool, str] = "auto"  # lockstep: static caches + compiled 1-token step; auto = on CUDA only
    sync_every: int = 0  # check "all rows done" every n steps (a host sync); 0: 1 on CPU, 8 on CUDA


@dataclass
class RolloutOutput:
    """``sequences [B, P + N]`` (pad after EOS), ``response_mask``/``from_teacher`` ``[B, N]``,
    ``gate [B, N]`` (NaN where not computed), ``teacher_logits [B, N, V]`` when kept;
    ``forwards``: decode forwards per model (``student``, ``teacher``; prefill not counted);
    ``logprobs [B, N]``: the student's log-probability of each token (``mixed`` rollouts only)."""

    sequences: Tensor
    response_mask: Tensor
    from_teacher: Tensor
    gate: Tensor
    teacher_logits: Optional[Tensor] = None
    forwards: Dict[str, int] = field(default_factory=dict)
    logprobs: Optional[Tensor] = None

    def responses(self, prompt_len: int) -> List[List[int]]:
        """Each row's response tokens (``sequences`` after the ``prompt_len`` prompt positions, EOS kept)."""
        return [self.sequences[i, prompt_len:][self.response_mask[i]].tolist() for i in range(self.sequences.shape[0])]


def use_compile(cfg: RolloutConfig, device: torch.device) -> bool:
    """Resolve ``cfg.compile`` (``auto``: on for CUDA, off elsewhere)."""
    value = str(cfg.compile).lower()
    if value not in ("auto", "true", "false", "on", "off"):
        raise ValueError(f"compile must be auto, true or false, got {cfg.compile!r}")
    return device.type == "cuda" if value == "auto" else value in ("true", "on")


def mix_logits(q_logits: Tensor, p_logits: Tensor, alpha: float) -> Tensor:
    """Log-probabilities ``[..., V]`` of the mixture ``alpha * softmax(p) + (1 - alpha) * softmax(q)``."""
    return mix_logprobs(torch.log_softmax(q_logits.float(), -1), torch.log_softmax(p_logits.float(), -1), alpha)


def chooser(cfg: RolloutConfig, generator: Optional[torch.Generator]) -> Callable[[Tensor], Tensor]:
    """Greedy argmax or sampling after temperature / top-k / top-p (transformers' warpers)."""
    if not cfg.do_sample:
        greedy = lambda logits: logits.argmax(-1)  # noqa: E731
        greedy.unwarped = greedy  # type: ignore[attr-defined]
        return greedy
    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))

    def draw(logits: Tensor) -> Tensor:
        # inverse-CDF sampling (float64 cumulative sums, u in (0, total]): the same distribution as
        # torch.multinomial, ~30x cheaper on a CPU at V = 50k; zero-probability tokens are never drawn
        cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)
        u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1).squeeze(-1)

    def sample(logits: Tensor) -> Tensor:
        return draw(warpers(None, logits))

    sample.unwarped = draw  # type: ignore[attr-defined]  (logits already warped: a rule's own teacher sampling)
    return sample


def setup(ref: Any, cfg: RolloutConfig, device: torch.device) -> tuple[int, Tensor, int, Callable[[Tensor], Tensor]]:
    """``(vocab, eos_ids [n], pad, choose)`` shared by every decode loop: the true vocabulary, the end-of-sequence
    ids, the pad id and the token chooser (:func:`chooser`: ``logits [B, V] -> tokens [B]``)."""
    vocab = cfg.vocab_size or head_rows(ref)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else ref.config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(ref.config, "pad_token_id", None)
    pad = int(pad if pad is not None else eos_ids[0])
    return vocab, eos_ids, pad, chooser(cfg, make_generator(cfg, device))


def make_generator(cfg: RolloutConfig, device: torch.device) -> Optional[torch.Generator]:
    """The loop's random generator, seeded with ``cfg.seed`` (None: the global torch RNG)."""
    return torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None


def finished(done: bool, synced: bool, device: torch.device) -> bool:
    """Whether a loop ends: ``done`` here, and with sharded models (collective forwards) on every rank."""
    return all_ranks(done, device) if synced else done


def teacher_prompts(input_ids: Tensor, attention_mask: Tensor, teacher_input_ids: Optional[Tensor],
                    teacher_attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The teacher's own left-padded prompts ``[B, P']`` (response priming), else the student's ``[B, P]``."""
    return (teacher_input_ids if teacher_input_ids is not None else input_ids,
            teacher_attention_mask if teacher_attention_mask is not None else attention_mask)


def head_rows(model: Any) -> int:
    """Rows of the model's LM head (its full size also when ZeRO-3 holds only a shard of it)."""
    w = model.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])


_COMPILED: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def compiled_forward(model: Any) -> Callable:
    """``torch.compile`` of ``model.forward`` (CUDA graphs on CUDA), made once per model."""
    fn = _COMPILED.get(model)
    if fn is None:
        cuda = next(model.parameters()).device.type == "cuda"
        fn = torch.compile(model.forward, mode="reduce-overhead" if cuda else "default", dynamic=False, fullgraph=False)
        _COMPILED[model] = fn
    return fn


def cache_arg(model: Any) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class Stepper:
    """One model's KV cache, attention mask (with holes), per-row next positions and latest logits.

    ``input_ids``/``attention_mask [B, P]`` left-padded prompts.  ``capacity``: with ``static`` the
    number of tokens the cache holds after the prompt; ``compiled``: one-token feeds go through
    :func:`compiled_forward` (static caches only).
    """

    def __init__(self, model: Any, input_ids: Tensor, attention_mask: Tensor, vocab: int,
                 static: bool = False, capacity: int = 0, compiled: bool = False) -> None:
        B, P = input_ids.shape
        self.model, self.vocab, self.static, self.length, self.forwards = model, vocab, static, P, 0
        self.step = compiled_forward(model) if (compiled and static) else model
        if static:  # the length rounded up to a multiple of 64, so that batches reuse compiled graphs
            size = -(-(P + max(1, capacity)) // 64) * 64
            self.cache: Any = StaticCache(config=model.config, max_cache_len=size)
            self.mask = attention_mask.new_zeros(B, size)
            self.mask[:, :P] = attention_mask
        else:
            self.cache, self.mask = DynamicCache(config=model.config), attention_mask.clone()
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # no [B, P, V] prefill logits
        self.cache_kw = cache_arg(model)
        out = model(input_ids=input_ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                    **{self.cache_kw: self.cache}, **keep)
        self.next_pos = pos[:, -1] + 1  # [B] position of the next fed token
        self.logits = out.logits[:, -1, :vocab].float()  # [B, V]

    def feed(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens [B, n]`` in one forward; returns the logits after each of them ``[B, n, V]``."""
        n = tokens.shape[1]
        if self.static:
            if self.length + n > self.mask.shape[1]:
                raise RuntimeError(f"static KV cache full ({self.mask.shape[1]} positions)")
            self.mask[:, self.length:self.length + n] = 1
            mask = self.mask
        else:
            self.mask = mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], n)], dim=1)
        pos = self.next_pos[:, None] + torch.arange(n, device=tokens.device)
        fn = self.step if n == 1 else self.model
        out = fn(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_kw: self.cache})
        self.length, self.next_pos, self.forwards = self.length + n, self.next_pos + n, self.forwards + 1
        logits = out.logits[..., : self.vocab].float()
        if fn is not self.model:
            logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
        self.logits = logits[:, -1]
        return logits

    def keep(self, counts: Tensor, n: int) -> None:
        """Of the last ``n`` fed columns, row ``b`` keeps the first ``counts[b]``; the others become
        masked holes and the row's next position moves back accordingly."""
        if n <= 0:
            return
        j = torch.arange(n, device=counts.device)
        self.mask[:, self.length - n:self.length] = (j[None, :] < counts[:, None]).to(self.mask.dtype)
        self.next_pos = self.next_pos - n + counts


class Record:
    """The rollout's output buffers ``[B, N]`` (plus a trash column N for writes that do not count)."""

    def __init__(self, B: int, N: int, vocab: int, pad: int, device: torch.device, keep_logits: bool,
                 keep_logprobs: bool = False) -> None:
        self.N, self.pad = N, pad
        self.logprob = torch.full((B, N + 1), float("nan"), device=device) if keep_logprobs else None
        self.tokens = torch.full((B, N + 1), pad, dtype=torch.long, device=device)
        self.resp = torch.zeros((B, N + 1), dtype=torch.bool, device=device)
        self.from_t = torch.zeros_like(self.resp)
        self.gate = torch.full((B, N + 1), float("nan"), device=device)
        self.kept = torch.zeros((B, N + 1, vocab), device=device) if keep_logits else None
        self.done = torch.zeros(B, dtype=torch.bool, device=device)

    def write(self, cols: Tensor, tok: Tensor, by_t: Tensor, gate: Optional[Tensor] = None,
              teacher_logits: Optional[Tensor] = None, logprob: Optional[Tensor] = None) -> None:
        """Write ``[B, n]`` decided tokens at response columns ``cols [B, n]`` (``N`` = discard)."""
        if self.logprob is not None and logprob is not None:
            self.logprob.scatter_(1, cols, logprob)
        self.tokens.scatter_(1, cols, tok)
        self.resp.scatter_(1, cols, torch.ones_like(by_t))
        self.from_t.scatter_(1, cols, by_t)
        if gate is not None:
            self.gate.scatter_(1, cols, gate.to(self.gate.dtype))
        if self.kept is not None and teacher_logits is not None:
            self.kept.scatter_(1, cols[..., None].expand(-1, -1, self.kept.shape[-1]), teacher_logits)

    def output(self, input_ids: Tensor, forwards: Dict[str, int]) -> RolloutOutput:
        N = self.N
        self.tokens[:, :N][~self.resp[:, :N]] = self.pad
        kept = self.kept[:, :N] if self.kept is not None else None
        return RolloutOutput(torch.cat([input_ids, self.tokens[:, :N]], dim=1), self.resp[:, :N],
                             self.from_t[:, :N], self.gate[:, :N], kept, forwards,
                             self.logprob[:, :N] if self.logprob is not None else None)
