"""Range and consistency checks of a loaded config, next to the fields they guard.

Imports nothing heavy, so a mistake is reported before torch/transformers load.  Each rule
raises :class:`switchkd.config.ConfigError` with the key and the valid range.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

Rule = Tuple[Callable[[Any], bool], str]

FINITE = "a finite number"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gt(lo: float) -> Rule:
    return (lambda v: _num(v) and v > lo), f"a finite number > {lo:g}"


def ge(lo: float) -> Rule:
    return (lambda v: _num(v) and v >= lo), f"a finite number >= {lo:g}"


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return _num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok, f"a value in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def optional(rule: Rule) -> Rule:
    fn, text = rule
    return (lambda v: v is None or fn(v)), f"{text} (or null)"


COUNT, COUNT0 = ge(1), ge(0)
PROB = in_range(0.0, 1.0)
RULES: Dict[str, Rule] = {
    "train.lr": gt(0), "train.batch_size": COUNT, "train.grad_accum": COUNT, "train.epochs": COUNT,
    "train.max_steps": optional(COUNT), "train.warmup_steps": COUNT0, "train.weight_decay": COUNT0,
    "train.clip": COUNT0, "train.seed": in_range(0, 2**32 - 1), "train.loss_chunk": COUNT0, "train.eval_every": COUNT0,
    "train.save_every": COUNT0, "train.log_every": COUNT,
    "data.max_prompt_length": COUNT, "data.max_length": ge(2), "data.limit": optional(COUNT),
    "data.synthetic_size": COUNT, "data.seed": in_range(0, 2**32 - 1),
    "method.temperature": gt(0), "method.kd_ratio": PROB, "method.mixture.student_ratio": PROB,
    "method.switch.ratio": PROB, "method.max_new_tokens": COUNT, "method.gen_temperature": gt(0),
    "method.top_k": COUNT0, "method.top_p": in_range(0.0, 1.0, lo_open=True),
    "method.switch.tau0": ((lambda v: isinstance(v, (int, float)) and v >= 0 and not math.isnan(v)),
                    "a number >= 0 (inf: the teacher never writes)"),
    "method.switch.decay": COUNT0, "method.distillm.replay_size": COUNT, "method.distillm.replay_ratio": PROB,
    "method.distillm.init_student_prob": PROB, "method.distillm.max_student_prob": PROB, "method.distillm.student_prob_step": COUNT0,
    "method.distillm.loss_eps": COUNT0, "method.minillm.teacher_mix": PROB, "method.minillm.gamma": PROB,
    "method.minillm.reward_scale": gt(0), "method.minillm.reward_clip": gt(0), "method.minillm.clip": PROB,
    "method.minillm.ppo_epochs": COUNT, "method.imitkd.base": gt(1), "method.skd.top_k": COUNT, "method.distillm.dev_limit": COUNT, "method.lm_weight": COUNT0, "method.instruction_weight": COUNT0, "method.switch.draft_k": COUNT, "method.switch.max_draft_k": COUNT,
    "eval.temperature": gt(0), "eval.top_p": in_range(0.0, 1.0, lo_open=True), "eval.top_k": COUNT0,
    "eval.max_length": ge(2), "eval.max_prompt_length": COUNT, "eval.max_new_tokens": optional(COUNT),
    "eval.batch_size": COUNT, "eval.limit": optional(COUNT),
    "model.lora.r": COUNT0, "model.lora.alpha": gt(0), "model.lora.dropout": in_range(0.0, 1.0, hi_open=True),
}
#: parameters each registry divergence accepts besides ``temperature`` (kept here, torch-free, so that a
#: config is checked before torch loads; ``switchkd.divergences.PARAMS`` is this table)
DIVERGENCE_PARAMS: Dict[str, tuple] = {
    "fkl": (), "rkl": (), "tvd": (), "jsd": ("beta",), "skl": ("alpha",), "srkl": ("alpha",),
    "topk_kl": ("k",), "topk_kl_renorm": ("k",), "bild": ("k",), "ce": (),
}
#: divergence parameters: name -> rule (``k``: at least 3 for BiLD, which needs pairs of pairs)
PARAM_RULES: Dict[str, Rule] = {"alpha": PROB, "beta": PROB, "k": ge(1)}
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "messages", "context", "response")
TEMPLATE_FIELDS = {"instruction", "input"}
PRIMING_FIELDS = {"reference"}
LOGGERS = ("tensorboard", "wandb")
TINY_KEYS = ("layers", "dim", "heads", "kv_heads", "ffn", "positions", "seed")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check(cfg: Any, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` at the first field outside its range or cross-field rule broken."""
    for dotted, (ok, text) in RULES.items():
        if dotted.startswith("teacher.") and cfg.teacher is None:
            continue
        value = _get(cfg, dotted)
        if not ok(value):
            raise error(f"config error: {dotted}={value!r}; expected {text}")
    for key, value in cfg.method.params.items():
        ok, text = PARAM_RULES.get(key, (_num, FINITE))
        if not ok(value) or (key == "k" and value != int(value)):
            raise error(f"config error: method.params.{key}={value!r}; expected {text}{' (an integer)' if key == 'k' else ''}")
    if cfg.method.divergence == "bild" and cfg.method.params.get("k", 8) < 3:
        raise error(f"config error: method.params.k={cfg.method.params['k']!r}; BiLD needs k >= 3")
    sw = cfg.method.switch
    if sw.max_draft_k < sw.draft_k:
        raise error(f"config error: method.switch.max_draft_k={sw.max_draft_k} is smaller than method.switch.draft_k="
                    f"{sw.draft_k}")
    bad_loggers = [x for x in cfg.train.loggers if x not in LOGGERS]
    if bad_loggers:
        raise error(f"config error: train.loggers has {bad_loggers[0]!r}; valid: {', '.join(LOGGERS)}")
    buckets = list(cfg.eval.buckets)
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets) or buckets != sorted(set(buckets)):
        raise error(f"config error: eval.buckets={buckets}; expected increasing word counts >= 1")
    if cfg.eval.max_prompt_length >= cfg.eval.max_length:
        raise error("config error: eval.max_prompt_length must be smaller than eval.max_length")
    _check_fields(cfg.data.fields, error)
    _check_placeholders("data.template", cfg.data.template, TEMPLATE_FIELDS, ("alpaca", "none", "chat"), error)
    if cfg.data.template not in ("alpaca", "none", "chat") and "instruction" not in set(_placeholders(cfg.data.template)):
        raise error(f"config error: data.template={cfg.data.template!r}: a custom template needs {{instruction}} "
                    "(or use alpaca, chat or none)")
    _check_placeholders("method.priming", cfg.method.priming, PRIMING_FIELDS,
                        ("none", "teacher", "ground_truth", "confidence"), error)
    for section in ("model", "teacher"):
        node = getattr(cfg, section)
        if node is not None and node.name.startswith("tiny:"):
            check_tiny(f"{section}.name", node.name, cfg.data.max_length, error)


def _check_fields(fields: Dict[str, Any], error: Callable[[str], Exception]) -> None:
    for key, value in fields.items():
        if key not in CANONICAL_FIELDS:
            raise error(f"config error: data.fields.{key} is not a canonical field; valid: {', '.join(CANONICAL_FIELDS)}")
        if not isinstance(value, str) or not value:
            raise error(f"config error: data.fields.{key}={value!r}; expected the name of a field in your data")


def _placeholders(text: str) -> Iterable[Optional[str]]:
    return (name for _, name, _, _ in string.Formatter().parse(text) if name is not None)


def _check_placeholders(key: str, text: str, allowed: set, named: Tuple[str, ...],
                        error: Callable[[str], Exception]) -> None:
    if text in named:
        return
    try:
        names = set(_placeholders(text))
    except ValueError as exc:
        raise error(f"config error: {key}={text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    bad = sorted(n for n in names if n not in allowed)
    if bad:
        raise error(f"config error: {key} uses {{{bad[0]}}}; valid placeholders: "
                    f"{', '.join('{' + a + '}' for a in sorted(allowed))}")


def check_tiny(key: str, spec: str, max_length: int, error: Callable[[str], Exception]) -> None:
    """Shapes of a ``tiny:ARCH,key=value`` spec: positive sizes, heads dividing dim, enough positions."""
    head, *rest = spec[len("tiny:"):].split(",")
    if head not in ("gpt2", "llama"):
        raise error(f"config error: {key}={spec!r}: tiny architecture must be gpt2 or llama")
    values = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "ffn": 0, "positions": 1024, "seed": 0}
    for item in rest:
        k, _, v = item.partition("=")
        if k not in TINY_KEYS or not v.lstrip("-").isdigit():
            raise error(f"config error: {key}={spec!r}: bad item {item!r}; keys: {', '.join(TINY_KEYS)} (integers)")
        values[k] = int(v)
    for k in ("layers", "dim", "heads", "kv_heads", "positions"):
        if values[k] < 1:
            raise error(f"config error: {key}={spec!r}: {k} must be >= 1")
    if values["ffn"] < 0 or values["seed"] < 0:
        raise error(f"config error: {key}={spec!r}: ffn and seed must be >= 0")
    if values["dim"] % values["heads"] or (head == "llama" and values["heads"] % values["kv_heads"]):
        raise error(f"config error: {key}={spec!r}: heads must divide dim (and kv_heads divide heads)")
    if head == "llama" and (values["dim"] // values["heads"]) % 2:
        raise error(f"config error: {key}={spec!r}: llama needs an even head size (dim / heads) for rotary positions")
    if values["positions"] < max_length:
        raise error(f"config error: {key}={spec!r}: positions={values['positions']} is fewer than "
                    f"data.max_length={max_length}")
