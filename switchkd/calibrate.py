"""Find a gate's tau0 (SWITCH's, :class:`switchkd.rules.Gate`) for a target teacher share by bisection on the
*measured* share.

A quantile of student-only gate values misses the share SWITCH then produces (teacher tokens
change the trajectory, and gates of random models are flat), so the share is measured by
rolling out at each candidate tau0 and tau0 is bisected on a log scale.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Optional

from torch import Tensor

from switchkd.rollout import RolloutConfig, RolloutOutput, rollout
from switchkd.rules import Gate

Roll = Callable[[Gate], RolloutOutput]  # a two-writer rollout of fixed prompts under a gate
TOLERANCE = 0.01  # a measured share this close to the target ends the search (the share of 8 prompts x 64 tokens
# moves in steps of ~0.01 between neighbouring tau0s: teacher tokens change the trajectories)


def teacher_share(student: Any, teacher: Any, ids: Tensor, mask: Tensor, cfg: RolloutConfig, gate: Gate,
                  roll: Optional[Roll] = None) -> float:
    """Fraction of response tokens the teacher writes under ``gate`` (``roll``: another decoder of the
    same prompts, e.g. across vocabularies)."""
    out = roll(gate) if roll is not None else rollout(student, teacher, ids, mask, cfg, gate)
    return float(out.from_teacher[out.response_mask].float().mean())


def calibrate_tau0(student: Any, teacher: Any, ids: Tensor, mask: Tensor, cfg: RolloutConfig, gate: Gate,
                   target: float, iters: int = 14, log: Optional[Callable[[str], None]] = None,
                   roll: Optional[Roll] = None, tolerance: float = TOLERANCE) -> tuple[float, float]:
    """``(tau0, measured share)``: the first tau0 whose measured share lies within ``tolerance`` of ``target``, else
    the closest found, by bisecting log(tau0) between bounds from a student-only probe's gate values (at most
    ``iters`` bisection rounds); ``gate`` gives the rest of the rule (schedule, decay, divergence) and ``cfg`` the
    sampling (a greedy ``cfg`` makes the search deterministic).  ``log`` receives one line per measured round."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target share must be in (0, 1), got {target}")
    roll = roll or (lambda g: rollout(student, teacher, ids, mask, cfg, g))
    probe = roll(replace(gate, tau0=float("inf")))
    g = probe.gate[probe.response_mask]
    g = g[g > 0]
    if g.numel() == 0:
        raise ValueError("the two models agree exactly on these prompts: no tau0 gives a teacher share")
    lo, hi = math.log(float(g.min()) / 2), math.log(float(g.max()) * 2)
    best = [math.inf, 0.0, 0.0]  # |share - target|, tau0, share

    def share_at(log_tau: float) -> float:
        share = teacher_share(student, teacher, ids, mask, cfg, replace(gate, tau0=math.exp(log_tau)), roll)
        best[:] = min(best, [abs(share - target), math.exp(log_tau), share])
        if log is not None:
            log(f"calibrate: round {share_at.rounds}: tau0 {math.exp(log_tau):.4g} -> teacher share {share:.3f} "
                f"(target {target} +- {tolerance})")
        share_at.rounds += 1
        return share

    share_at.rounds = 1  # type: ignore[attr-defined]
    for end, want_above, step in ((hi, False, 2.0), (lo, True, -2.0)):  # widen the bracket: the share is
        for _ in range(10):  # measured on trajectories that teacher tokens change, so probe bounds can miss
            share = share_at(end)
            if best[0] <= tolerance or (share >= target) == want_above:
                break
            end += step
        if best[0] <= tolerance:
            return best[1], best[2]
        hi, lo = (end, lo) if not want_above else (hi, end)
    for _ in range(iters):
        mid = (lo + hi) / 2
        share = share_at(mid)
        if best[0] <= tolerance:
            break
        if share > target:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def ln2_note(gate: Gate) -> Optional[str]:
    """What a tau0 above the gate's largest value (ln 2 for the Jensen-Shannon divergence, in nats) means, else None:
    no gate value can exceed tau_t until tau_t falls below it, so the student writes every token before that
    position and the gate acts as a position cut-off."""
    top = gate.maximum
    if top is None or gate.tau0 <= top:
        return None
    tau0, decay, name = gate.tau0, gate.decay, f"{top:.3f}, the largest {gate.divergence.upper()}"
    if top == math.log(2):
        name = "ln 2 = 0.693, the largest " + gate.divergence.upper()
    if gate.schedule == "const":
        return (f"tau0 {tau0:.4g} exceeds {name}: with schedule const the teacher never writes")
    t = math.log(tau0 / top) / decay if gate.schedule == "exp" else (1 - top / tau0) / decay
    return (f"tau0 {tau0:.4g} exceeds {name}: the gate cannot fire before response token "
            f"{math.ceil(t)}, so the student writes the first {math.ceil(t)} tokens whatever the teacher thinks and "
            "the gate acts as a position cut-off: the two models disagree almost everywhere; train the student "
            "on the data first (supervised fine-tuning, as the official recipes of on-policy methods do, longer if it already was) and calibrate again")


def calibrate_config(cfg: Any, target: float, limit: int = 32, batch_size: int = 8,
                     log: Optional[Callable[[str], None]] = None, iters: int = 14,
                     tolerance: float = TOLERANCE) -> tuple[float, float]:
    """``switchkd calibrate``: tau0 for a ``target`` teacher share on the first ``limit`` prompts of
    ``data.dev`` (else ``data.train``), decoded as the config's rollouts are (its source's gate: schedule, decay,
    divergence; sampling seeded with ``train.seed``) on one batch of ``batch_size`` at a time."""
    import torch

    from switchkd.data import left_pad, load_examples, tokenize
    from switchkd.methods import source_class
    from switchkd.models import load_pair
    from switchkd.rollout import from_method
    from switchkd.sections import ConfigError

    source = source_class(cfg.method.source)
    gate = gate_of(cfg)
    if cfg.teacher is None:
        raise ConfigError("config error: switchkd calibrate needs teacher.name")
    view = _cross_view(cfg)
    student, teacher, tok, vocab = load_pair(cfg.model, cfg.teacher, cross=view is not None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student.to(device).eval()
    teacher.to(device)
    examples = load_examples(cfg.data.dev or cfg.data.train, cfg.data, tok, limit)
    items, _ = tokenize(examples, tok, cfg.data.max_prompt_length, cfg.data.max_length, cfg.method.priming,
                        view.t_tok if view is not None else None)
    if not items:
        raise ConfigError("config error: calibrate: no prompts left after tokenization")
    items = items[:batch_size]
    ids, mask = left_pad([x.prompt for x in items], tok.pad_token_id)
    rcfg = from_method(cfg.method, min(cfg.method.max_new_tokens, cfg.data.max_length - ids.shape[1]), tok, vocab,
                       **source.engine_settings(cfg))
    ids, mask = ids.to(device), mask.to(device)
    roll = None
    if view is not None:  # across vocabularies: the teacher reads its own prompts (switchkd.interleave)
        from switchkd.interleave import Vocab, cross_switch

        t_ids, t_mask = (x.to(device) for x in left_pad([x.teacher_prompt for x in items], view.t_tok.pad_token_id or 0))
        vocabs = Vocab(view.s_tok, view.s_table), Vocab(view.t_tok, view.t_table)
        c = teacher.config
        t_max = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        seeded = replace(rcfg, seed=cfg.train.seed)
        roll = lambda g: cross_switch(student, teacher, ids, mask, t_ids, t_mask, seeded, g, *vocabs,  # noqa: E731
                                      shared=(view.s_matched, view.t_matched), t_max_len=t_max)
    return calibrate_tau0(student, teacher, ids, mask, replace(rcfg, seed=cfg.train.seed), gate, target, iters=iters,
                          log=log, roll=roll, tolerance=tolerance)


def gate_of(cfg: Any) -> Gate:
    """The gate whose tau0 ``switchkd calibrate`` finds: the config's source's rule (one line when it has none)."""
    from switchkd.methods import source_class
    from switchkd.sections import ConfigError

    rule = source_class(cfg.method.source).rule(cfg)
    if not isinstance(rule, Gate):
        raise ConfigError(f"method.source={cfg.method.source} decodes by {type(rule).__name__}, which has no tau0: "
                          "switchkd calibrate finds a gate's tau0 (a preset whose source decodes by a gate)")
    return rule


def _cross_view(cfg: Any) -> Any:
    """The run's :class:`switchkd.cross.CrossView` when the teacher's vocabulary differs (else None)."""
    from switchkd.cross import view_for
    from switchkd.methods import source_class
    from switchkd.models import load_tokenizer

    return view_for(cfg, load_tokenizer(cfg.model), load_tokenizer(cfg.teacher),
                    source_class(cfg.method.source).needs(cfg).across_vocabularies)
