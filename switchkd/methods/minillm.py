"""MiniLLM (Gu et al., ICLR 2024; ``source: minillm``) by the rules of the official code
(microsoft/LMOps ``minillm/``: ``sampler.py``, ``losses.py``; defaults from ``arguments.py`` and
the GPT-2 scripts).

Sequences: the student samples each response from the teacher-mixed distribution
``p~ = a p + (1 - a) q`` (``teacher_mix`` = a; the rollout engine's ``mixed`` mode), in eval mode; each
rollout batch is then trained on ``ppo_epochs`` times in a row with its old log-probabilities fixed.
Per response token t of a sampled sequence:

- reward ``r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scale, +-reward_clip)``;
- advantage ``A_t = sum_{t' >= t} gamma^(t'-t) r_t' / L_t`` with ``L_t`` the number of tokens from t
  on (``length_norm=count``, LMOps), ``sum_{t' >= t} gamma^(t'-t)`` (``discounted``, TRL's
  ``_compute_advantage``) or 1 (``none``); then whitened (``whiten``, LMOps ``utils.whiten``) over the
  generation block ``[B, R]`` with its zero padding, R being the fixed generation budget
  ``min(method.max_new_tokens, data.max_length - data.max_prompt_length)`` as LMOps pads every
  generation to ``max_length`` (or the longest response when that is longer); detached;
- importance weight ``w_t = q_old(y_t) / p~(y_t)`` (1 when ``teacher_mix`` = 0).

The loss per token is ``method.divergence`` (MiniLLM's single-step decomposition: ``rkl``, the exact
reverse KL over the vocabulary, on the teacher logits the rollout kept) plus the clipped policy term
(:class:`switchkd.batch.PolicyTerm`, :func:`switchkd.losses.policy_loss`).  The presets use LMOps'
AdamW (betas 0.9, 0.95; weight decay 1e-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Iterator, List, Optional

from switchkd.methods.base import Error, Needs, Source
from switchkd.schema import COUNT, PROB, gt, opt

if TYPE_CHECKING:
    from torch import Tensor

    from switchkd.batch import Batch, PolicyTerm
    from switchkd.config import Config
    from switchkd.rules import Rule


@dataclass
class MinillmConfig:
    """``method.minillm``: LMOps minillm's settings (its GPT-2 scripts' values)."""

    teacher_mix: float = opt(0.2, "--teacher-mixed-alpha: sample from alpha p_teacher + (1 - alpha) q_student",
                             rule=PROB)
    gamma: float = opt(0.95, "--gamma: the reward-to-go's discount", rule=PROB)
    length_norm: str = opt("count", "the reward-to-go divided by the remaining token count (LMOps), the discount "
                           "sum (TRL), or nothing", choices=("count", "discounted", "none"))
    whiten: bool = opt(True, "whiten the advantages over the generation block (LMOps)")
    reward_scale: float = opt(0.5, "--reward-scaling: rewards divided by it", rule=gt(0))
    reward_clip: float = opt(100.0, "--cliprange-reward: rewards clipped to +- this", rule=gt(0))
    clip: float = opt(0.2, "--cliprange: the PPO ratio clipping", rule=PROB)
    ppo_epochs: int = opt(4, "--ppo-epochs: each rollout batch is trained on this many times", rule=COUNT)


def rewards(teacher_lp: "Tensor", student_lp: "Tensor", mask: "Tensor", scale: float = 1.0,
            clip: float = math.inf) -> "Tensor":
    """Per-token rewards ``[B, T]``: ``(log p - log q_old) / scale`` clipped to ``+-clip``, 0 off ``mask``."""
    r = ((teacher_lp - student_lp) * mask) / scale
    return r.clamp(-clip, clip) if math.isfinite(clip) else r


def whiten(x: "Tensor") -> "Tensor":
    """``(x - mean) / sqrt(var + 1e-8)`` over every element of ``x`` (padding included, unbiased
    variance, statistics over all processes when distributed), as LMOps ``utils.whiten``."""
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
        dist.all_reduce(stats)
        mean = stats[0] / stats[1]
        var = ((x - mean) ** 2).sum()
        dist.all_reduce(var)
        var = var / stats[1]  # LMOps' distributed branch: the population variance
    else:
        var, mean = torch.var_mean(x)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def advantages(r: "Tensor", mask: "Tensor", gamma: float, length_norm: str = "count",
               whitened: bool = False) -> "Tensor":
    """Reward-to-go ``[B, T]`` from rewards ``r [B, T]`` (0 off ``mask``), normalised by the remaining
    length (``count`` | ``discounted`` | ``none``) and optionally whitened over the whole block; detached."""
    import torch

    r, m = r.double(), mask.double()
    gap = torch.arange(r.shape[1], device=r.device, dtype=r.dtype)
    gap = gap[:, None] - gap[None, :]  # [i, t] = i - t
    discount = torch.where(gap >= 0, torch.pow(gamma, gap.clamp(min=0)), 0.0)  # [i, t] = gamma^(i-t), i >= t
    out = r @ discount  # sum_{i >= t} gamma^(i-t) r_i
    if length_norm != "none":
        lens = m @ (discount if length_norm == "discounted" else (gap >= 0).to(r.dtype))
        out = out / lens.masked_fill(lens == 0, 1.0)
    out = out * m
    return (whiten(out) if whitened else out).float().detach()


def importance_weight(student_lp: "Tensor", teacher_lp: "Tensor", alpha: float) -> "Tensor":
    """``q(y) / (alpha p(y) + (1 - alpha) q(y))`` from the sampled tokens' log-probabilities (any shape)."""
    import torch

    from switchkd.rules import mix_logprobs

    return torch.exp(student_lp - mix_logprobs(student_lp, teacher_lp, alpha))


def spread(values: "Tensor", mask: "Tensor") -> "Tensor":
    """Response-token values ``[N]`` (row-major) laid out as ``[B, R]`` by ``mask`` (0 elsewhere)."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


def generation_block(lengths: "Tensor", width: int) -> "Tensor":
    """The mask ``[B, R]`` of each row's first ``lengths[b]`` positions, ``R = max(width, max length)``."""
    import torch

    R = max(int(width), int(lengths.max()))
    return torch.arange(R, device=lengths.device)[None, :] < lengths[:, None]


class MinillmSource(Source):
    """MiniLLM's sequences and per-token policy term (see the module docstring).

    Rollouts belong to optimizer steps: a step's ``train.grad_accum`` micro-batches are each rolled out
    once (LMOps' ``chunk_size`` x ``gradient_accumulation_steps`` samples per PPO batch), and the same
    micro-batches are the next ``ppo_epochs - 1`` steps' too, so each rollout gets ``ppo_epochs``
    updates and no prompt batch is drawn and discarded.  The student trains without dropout (LMOps: "no
    dropout for RL")."""

    name: ClassVar[str] = "minillm"
    section: ClassVar[Optional[str]] = "minillm"
    Section: ClassVar[Optional[type]] = MinillmConfig
    dropout = False

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        d = cfg.method.decoding
        served = None if d.engine == "vllm" else (
            "the teacher-mixed sampling needs the teacher at every step; set method.decoding.engine=vllm (vLLM drafts, "
            "the teacher's tokens sampled by its server) or load the teacher in the process")
        vllm = None
        if not d.do_sample or d.temperature != 1.0 or d.top_k or d.top_p < 1.0:
            vllm = ("decodes the teacher-mixed distribution greedily or after temperature/top-k/top-p, which vLLM "
                    "drafts cannot reproduce (each writer's tokens would be chosen apart); set "
                    "method.decoding.do_sample=true, temperature=1, top_k=0, top_p=1")
        return Needs(teacher=f"method.source={cls.name}", served_teacher=served, vllm=vllm)

    @classmethod
    def check(cls, cfg: "Config", error: Error) -> None:
        m = cfg.method
        if m.instruction_weight > 0 or m.priming != "none":
            raise error("config error: method.source=minillm works with method.instruction_weight=0 and "
                        "method.priming=none (its rewards need the teacher on the student's own prompt)")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held: Optional[List["Batch"]] = None
        self.uses = 0
        self.sums = {"reward": 0.0, "weight": 0.0, "tokens": 0.0}

    @classmethod
    def rule(cls, cfg: "Config") -> "Rule":
        """MiniLLM's teacher-mixed sampling with alpha = ``method.minillm.teacher_mix``."""
        from switchkd.rules import Mixture

        return Mixture(alpha=cfg.method.minillm.teacher_mix)

    def __call__(self, batch: "Batch", step: int) -> "Batch":
        """One fresh rollout of ``batch`` with its policy term."""
        if self.run.cross is not None:
            return self._across(batch)
        new, out = self._rollout(batch, self.rule(self.cfg), keep_teacher=True)
        if getattr(self.teacher, "served", False):  # the served top k + tail and the sampled tokens' log-probabilities
            new.teacher_selected = self.teacher.targets(new, self.vocab)
        new.policy = self.policy(new, out.logprobs[out.response_mask])
        return new

    def _across(self, batch: "Batch") -> "Batch":
        """Across vocabularies: the teacher-mixed sampling by writer (each step the teacher writes one of its tokens
        with probability ``teacher_mix``, else the student one of its own; :mod:`switchkd.interleave`), and the
        rewards over aligned spans: a group's ``log p(span) - log q_old(span)`` (the sums of its tokens'
        log-probabilities on each side) on its last student token, 0 on the others; importance weight
        ``q(span) / (a p(span) + (1 - a) q(span))`` on each of its tokens.  Unpaired groups get reward 0, weight 1."""
        import torch

        new = self.run.cross.apply(self._interleaved(batch, self.rule(self.cfg))[0])
        a, alpha = new.alignment, self.settings.teacher_mix
        with torch.no_grad():
            s_lp = _token_logprobs(self.unwrap(self.student), new.input_ids, new.attention_mask, new.labels)
            t_lp = _token_logprobs(self.teacher, new.teacher_input_ids, new.teacher_attention_mask, new.teacher_labels)
            s_span = s_lp.new_zeros(a.n).index_add(0, a.student, s_lp)
            t_span = t_lp.new_zeros(a.n).index_add(0, a.teacher.to(t_lp.device), t_lp).to(s_lp.device)
            last = torch.ones_like(a.student, dtype=torch.bool)
            last[:-1] = a.student[1:] != a.student[:-1]
            at = last & a.paired[a.student]
            t_r, s_r = torch.where(at, t_span[a.student], 0.0), torch.where(at, s_span[a.student], 0.0)
            w = torch.where(a.paired[a.student], importance_weight(s_span, t_span, alpha)[a.student], 1.0)
        new.policy = self._policy(new, s_lp, t_r, s_r, w)
        return new

    def step_batches(self, batches: Iterator["Batch"], step: int, n: int) -> List["Batch"]:
        """The held rollouts while they have PPO epochs left, else ``n`` fresh ones."""
        if self.held is not None and len(self.held) == n and self.uses < self.settings.ppo_epochs:
            self.uses += 1
            return [b.to(self.held[0].device) for b in self.held]
        self.held, self.uses = [self(next(batches), step) for _ in range(n)], 1
        return self.held

    def policy(self, batch: "Batch", s_lp: "Tensor") -> "PolicyTerm":
        """The policy term of a rolled-out batch from the student's log-probabilities of its tokens as the
        rollout drew them ``s_lp [N]`` (eval mode)."""
        import torch

        with torch.no_grad():
            y = batch.labels[:, 1:][batch.labels[:, 1:] != -100]
            t = batch.teacher_selected
            t_lp = t.token_logp if hasattr(t, "token_logp") else torch.log_softmax(t.float(), -1).gather(-1, y[:, None]).squeeze(-1)
            w = importance_weight(s_lp, t_lp, self.settings.teacher_mix)
        return self._policy(batch, s_lp, t_lp, s_lp, w)

    def _policy(self, batch: "Batch", s_lp: "Tensor", t_r: "Tensor", s_r: "Tensor", w: "Tensor") -> "PolicyTerm":
        """The policy term from per response token ``[N]``: the student's log-probabilities ``s_lp``, the teacher's
        and the student's log-probabilities the rewards compare (``t_r``, ``s_r``) and the importance weights."""
        import torch

        from switchkd.batch import PolicyTerm

        m, cfg = self.settings, self.cfg
        with torch.no_grad():
            n = (batch.labels[:, 1:] != -100).sum(1)  # each row's response tokens, left-aligned in [B, R]
            mask = generation_block(n, min(cfg.method.max_new_tokens, cfg.data.max_length - cfg.data.max_prompt_length))
            r = rewards(spread(t_r, mask), spread(s_r, mask), mask, m.reward_scale, m.reward_clip)
            adv = advantages(r, mask, m.gamma, m.length_norm, m.whiten)[mask]
        self.sums["reward"] += float(r[mask].sum())
        self.sums["weight"] += float(w.sum())
        self.sums["tokens"] += float(mask.sum())
        return PolicyTerm(adv, s_lp, w, m.clip)

    def stats(self) -> Dict[str, float]:
        n = self.sums["tokens"]
        if n == 0:
            return {}
        out = {"minillm/reward": self.sums["reward"] / n, "minillm/weight": self.sums["weight"] / n}
        self.sums = dict.fromkeys(self.sums, 0.0)
        return out

    def state_dict(self) -> Dict[str, Any]:
        held = [_plain(b) for b in self.held] if self.held else None
        return super().state_dict() | {"held": held, "uses": self.uses}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        held = state.get("held")
        self.held, self.uses = ([_from_plain(b) for b in held] if held else None), state.get("uses", 0)


def _token_logprobs(model: Any, input_ids: "Tensor", attention_mask: "Tensor", labels: "Tensor") -> "Tensor":
    """The model's log-probability of each response token ``[N]`` (``labels[:, 1:]`` outside -100, row-major), in eval
    mode (dropout off, as the rollout ran)."""
    import torch

    was_training = model.training
    model.eval()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    model.train(was_training)
    y = labels[:, 1:]
    sel = y != -100
    return torch.log_softmax(logits[sel], -1).gather(-1, y[sel][:, None]).squeeze(-1)


def _plain(batch: "Batch") -> Dict[str, Any]:
    """A held batch as tensors, numbers and containers (checkpoints are loaded with ``weights_only``)."""
    import dataclasses

    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "policy"}
    out = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in out.items()}
    t = out.get("teacher_selected")
    if hasattr(t, "token_logp"):  # a served teacher's targets (TopKTail)
        out["teacher_selected"] = {"served": [t.logp.cpu(), t.ids.cpu(), t.vocab, t.token_logp.cpu()]}
    p = batch.policy
    return out | ({"policy": [p.advantage.cpu(), p.old_logprob.cpu(), p.weight.cpu(), p.clip]} if p else {})


def _from_plain(state: Dict[str, Any]) -> "Batch":
    from switchkd.batch import Batch, PolicyTerm

    state = dict(state)
    policy = state.pop("policy", None)
    t = state.get("teacher_selected")
    if isinstance(t, dict) and "served" in t:
        from switchkd.divergences import TopKTail

        state["teacher_selected"] = TopKTail(*t["served"])
    return Batch(**state, policy=PolicyTerm(*policy) if policy else None)
