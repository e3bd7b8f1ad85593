"""The rollout engine: one batched, KV-cached decoding loop for student, teacher, or both.

``source="switch"`` is SWITCH (Koo et al., NAACL Findings 2025): at response position
t (0 = first generated token) both models see the same prefix; with p_t the teacher's
and q_t the student's next-token distribution, d_t = gate(p_t, q_t) is compared with
tau_t (``exp``: tau0 * exp(-decay * t); ``linear``: tau0 * max(0, 1 - decay * t);
``const``: tau0).  If d_t > tau_t the teacher writes the token (sampled, or its argmax
when greedy), else the student does; the chosen token enters both KV caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from switchkd.divergences import fkl, jsd, rkl, tvd
from switchkd.losses import accepts_logits_to_keep

GATES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "jsd": lambda s, t: jsd(s, t, beta=0.5),  # symmetric Jensen-Shannon, natural log
    "fkl": fkl,
    "rkl": rkl,
    "tvd": tvd,
}


@dataclass
class RolloutConfig:
    """How to decode. ``source``: ``student``, ``teacher`` or ``switch``."""

    source: str = "student"
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    tau0: float = 0.1
    decay: float = 0.1
    schedule: str = "exp"  # exp | linear | const
    gate: str = "jsd"  # jsd | fkl | rkl | tvd
    seed: Optional[int] = None  # None: the global torch RNG
    eos_token_id: Optional[int | Sequence[int]] = None  # default: the model config's
    pad_token_id: Optional[int] = None  # default: the model config's, else EOS
    vocab_size: Optional[int] = None  # true vocabulary (logits beyond it are ignored)
    keep_teacher_logits: bool = False  # return the teacher's next-token logits per step
    speculative: bool = True  # switch only: student drafts, teacher verifies a block per forward
    draft_k: int = 4  # first draft length; then chosen from the recent rejection rate (speculative.next_k)
    max_draft_k: int = 16
    teacher_cost: Optional[float] = None  # teacher forward cost / student's; default: layer-count ratio


@dataclass
class RolloutOutput:
    """``sequences [B, P + N]`` (pad after EOS), ``response_mask``/``from_teacher`` ``[B, N]``,
    ``gate [B, N]`` (NaN where not computed), ``teacher_logits [B, N, V]`` when kept."""

    sequences: Tensor
    response_mask: Tensor
    from_teacher: Tensor
    gate: Tensor
    teacher_logits: Optional[Tensor] = None


def from_method(method: Any, source: str, max_new_tokens: int, tokenizer: Any, vocab: int,
                keep_teacher_logits: bool = False) -> RolloutConfig:
    """The :class:`RolloutConfig` that a training config's ``method`` section describes."""
    m = method
    return RolloutConfig(source=source, max_new_tokens=max(1, max_new_tokens), do_sample=m.do_sample,
                         temperature=m.gen_temperature, top_k=m.top_k, top_p=m.top_p, tau0=m.tau0, decay=m.decay,
                         schedule=m.schedule, gate=m.gate, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, vocab_size=vocab, keep_teacher_logits=keep_teacher_logits)


def threshold(t: int, cfg: RolloutConfig) -> float:
    """tau_t for response position ``t``."""
    if cfg.schedule == "exp":
        return cfg.tau0 * math.exp(-cfg.decay * t) if math.isfinite(cfg.tau0) else cfg.tau0
    if cfg.schedule == "linear":
        return cfg.tau0 * max(0.0, 1.0 - cfg.decay * t) if math.isfinite(cfg.tau0) else cfg.tau0
    if cfg.schedule == "const":
        return cfg.tau0
    raise ValueError(f"schedule must be exp, linear or const, got {cfg.schedule!r}")


class _Stepper:
    """One model's KV cache, attention mask, positions and latest next-token logits."""

    def __init__(self, model: Any, input_ids: Tensor, attention_mask: Tensor, vocab: int) -> None:
        self.model, self.vocab, self.mask = model, vocab, attention_mask
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # no [B, P, V] prefill logits
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, **keep)
        self.cache, self.pos = out.past_key_values, pos[:, -1]
        self.logits = out.logits[:, -1, :vocab].float()  # [B, V]

    def advance(self, tokens: Tensor) -> None:
        """Feed ``tokens [B]`` and update the next-token logits."""
        self.feed(tokens[:, None])

    def feed(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens [B, n]`` in one forward; returns the logits after each of them ``[B, n, V]``."""
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], n)], dim=1)
        pos = self.pos[:, None] + torch.arange(1, n + 1, device=tokens.device)
        self.pos = pos[:, -1]
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True)
        logits = out.logits[..., : self.vocab].float()
        self.cache, self.logits = out.past_key_values, logits[:, -1]
        return logits

    def crop(self, length: int) -> None:
        """Roll the cache back to its first ``length`` positions (prompt included)."""
        drop = self.mask.shape[1] - length
        if drop > 0:
            self.cache.crop(-drop)  # transformers 5: a negative count removes that many positions
            self.mask = self.mask[:, :length]
            self.pos = self.pos - drop


def _chooser(cfg: RolloutConfig, generator: Optional[torch.Generator]) -> Callable[[Tensor], Tensor]:
    """Greedy argmax or sampling after temperature / top-k / top-p (transformers' warpers)."""
    if not cfg.do_sample:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))

    def sample(logits: Tensor) -> Tensor:
        # inverse-CDF sampling (float64 cumulative sums, u in (0, total]): the same distribution as
        # torch.multinomial, ~30x cheaper on a CPU at V = 50k; zero-probability tokens are never drawn
        cdf = torch.softmax(warpers(None, logits), dim=-1).double().cumsum(-1)
        u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1).squeeze(-1)

    return sample


def _setup(ref: Any, cfg: RolloutConfig, device: torch.device) -> tuple[int, Tensor, int, Callable, Callable]:
    """``(vocab, eos_ids, pad, choose, gate_fn)`` shared by the lockstep and speculative decoders."""
    vocab = cfg.vocab_size or ref.get_output_embeddings().weight.shape[0]
    eos_ids, pad = _special_ids(ref, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    return vocab, eos_ids.to(device), pad, _chooser(cfg, gen), GATES[cfg.gate]


def _special_ids(model: Any, cfg: RolloutConfig) -> tuple[Tensor, int]:
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else model.config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    return eos_ids, int(pad if pad is not None else eos_ids[0])


@torch.no_grad()
def rollout(
    student: Optional[Any],
    teacher: Optional[Any],
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: RolloutConfig,
    teacher_input_ids: Optional[Tensor] = None,
    teacher_attention_mask: Optional[Tensor] = None,
) -> RolloutOutput:
    """Decode ``cfg.max_new_tokens`` tokens after left-padded prompts ``input_ids [B, P]``.

    The teacher may see its own left-padded prompt (response priming) through
    ``teacher_input_ids``/``teacher_attention_mask``; the generated tokens are shared.
    """
    if cfg.source not in ("student", "teacher", "switch"):
        raise ValueError(f"source must be student, teacher or switch, got {cfg.source!r}")
    if cfg.source == "switch" and cfg.speculative:
        from switchkd.speculative import speculative_switch

        return speculative_switch(student, teacher, input_ids, attention_mask, cfg, teacher_input_ids,
                                  teacher_attention_mask)
    use_s, use_t = cfg.source in ("student", "switch"), cfg.source in ("teacher", "switch")
    ref = student if use_s else teacher
    if ref is None or (use_t and teacher is None):
        raise ValueError(f"source={cfg.source!r} needs the {'teacher' if use_t else 'student'} model")
    device = input_ids.device
    vocab, eos_ids, pad, choose, gate_fn = _setup(ref, cfg, device)
    s = _Stepper(student, input_ids, attention_mask, vocab) if use_s else None
    t_ids = teacher_input_ids if teacher_input_ids is not None else input_ids
    t_mask = teacher_attention_mask if teacher_attention_mask is not None else attention_mask
    tt = _Stepper(teacher, t_ids, t_mask, vocab) if use_t else None
    B, N = input_ids.shape[0], cfg.max_new_tokens
    tokens = torch.full((B, N), pad, dtype=torch.long, device=device)
    resp = torch.zeros((B, N), dtype=torch.bool, device=device)
    from_t = torch.zeros_like(resp)
    gate = torch.full((B, N), float("nan"), device=device)
    kept = torch.zeros((B, N, vocab), device=device) if (cfg.keep_teacher_logits and use_t) else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(N):
        if cfg.source == "student":
            tok, by_t = choose(s.logits), torch.zeros_like(done)
        elif cfg.source == "teacher":
            tok, by_t = choose(tt.logits), torch.ones_like(done)
        else:
            d = gate_fn(s.logits, tt.logits)
            by_t = d > threshold(t, cfg)
            tok = torch.where(by_t, choose(tt.logits), choose(s.logits))
            gate[:, t] = d
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens[:, t], resp[:, t], from_t[:, t] = tok, ~done, by_t & ~done
        if kept is not None:
            kept[:, t] = tt.logits
        done = done | torch.isin(tok, eos_ids)
        if bool(done.all()) or t == N - 1:
            break
        for stepper in (s, tt):
            if stepper is not None:
                stepper.advance(tok)
    return RolloutOutput(torch.cat([input_ids, tokens], dim=1), resp, from_t, gate, kept)
