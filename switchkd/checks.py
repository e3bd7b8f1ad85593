"""Range and consistency checks of a loaded config: the ranges declared in the schema, and the rules
that span fields.

Imports nothing heavy, so a mistake is reported before torch/transformers load.  Each rule
raises :class:`switchkd.config.ConfigError` with the key and the valid range.
"""

from __future__ import annotations

import string
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from switchkd.divergence_table import PARAM_MINIMA, PLAIN
from switchkd.divergence_table import PARAMS as DIVERGENCE_PARAMS
from switchkd.divergence_table import SERVED as SERVED_DIVERGENCES
from switchkd.methods import SOURCES
from switchkd.schema import FINITE_TEXT as FINITE
from switchkd.schema import PROB, Rule, _num, choices, ge, get, rules

#: divergence parameters: name -> rule (``k``: at least 3 for BiLD, which needs pairs of pairs)
PARAM_RULES: Dict[str, Rule] = {"alpha": PROB, "beta": PROB, "k": ge(1)}
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "messages", "context", "response")
TEMPLATE_FIELDS = {"instruction", "input"}
PRIMING_FIELDS = {"reference"}
LOGGERS = ("tensorboard", "wandb")
NAMED_TEMPLATES = ("auto", "alpaca", "none", "chat")
TINY_KEYS = ("layers", "dim", "heads", "kv_heads", "ffn", "positions", "seed")


def check(cfg: Any, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` at the first field outside its range or cross-field rule broken."""
    for dotted, ((ok, text), section) in rules(type(cfg)).items():
        if section and getattr(cfg, section) is None:
            continue
        value = get(cfg, dotted)
        if not ok(value):
            raise error(f"config error: {dotted}={value!r}; expected {text}")
    for key, value in cfg.method.params.items():
        ok, text = PARAM_RULES.get(key, (_num, FINITE))
        if not ok(value) or (key == "k" and value != int(value)):
            raise error(f"config error: method.params.{key}={value!r}; expected {text}{' (an integer)' if key == 'k' else ''}")
    for key, least in PARAM_MINIMA.get(cfg.method.divergence, {}).items():
        if key in cfg.method.params and cfg.method.params[key] < least:
            raise error(f"config error: method.params.{key}={cfg.method.params[key]!r}; {cfg.method.divergence} needs "
                        f"{key} >= {least:g}")
    bad_loggers = [x for x in cfg.train.loggers if x not in LOGGERS]
    if bad_loggers:
        raise error(f"config error: train.loggers has {bad_loggers[0]!r}; valid: {', '.join(LOGGERS)}")
    import importlib.util

    missing = [x for x in cfg.train.loggers if importlib.util.find_spec(x) is None]
    if missing:
        raise error(f"config error: train.loggers has {missing[0]!r}, which is not installed: pip install "
                    f"'switchkd[logging]' (or pip install {missing[0]}), or remove it from train.loggers")
    buckets = list(cfg.eval.buckets)
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets) or buckets != sorted(set(buckets)):
        raise error(f"config error: eval.buckets={buckets}; expected increasing word counts >= 1")
    if cfg.eval.max_prompt_length >= cfg.eval.max_length:
        raise error("config error: eval.max_prompt_length must be smaller than eval.max_length")
    _check_fields(cfg.data.fields, error)
    _check_placeholders("data.template", cfg.data.template, TEMPLATE_FIELDS, NAMED_TEMPLATES, error)
    if cfg.data.template not in NAMED_TEMPLATES and "instruction" not in set(_placeholders(cfg.data.template)):
        raise error(f"config error: data.template={cfg.data.template!r}: a custom template needs {{instruction}} "
                    "(or use alpaca, chat or none)")
    _check_placeholders("method.priming", cfg.method.priming, PRIMING_FIELDS,
                        ("none", "teacher", "ground_truth", "confidence"), error)
    for section in ("model", "teacher"):
        node = getattr(cfg, section)
        if node is not None and node.name.startswith("tiny:"):
            check_tiny(f"{section}.name", node.name, cfg.data.max_length, error)


def validate(cfg: Any, error: Callable[[str], Exception]) -> None:
    """Check choices, ranges and cross-field rules (each method's own included) of a loaded config; raise
    ``error(message)`` at the first broken one."""
    for dotted, (valid, section) in choices(type(cfg)).items():
        if section and getattr(cfg, section) is None:
            continue
        value = get(cfg, dotted)
        if value not in valid:
            raise error(f"config error: {dotted}={value!r}; valid choices: {', '.join(valid)}")
    m = cfg.method
    bad = set(m.params) - set(DIVERGENCE_PARAMS[m.divergence])
    if bad:
        raise error(
            f"config error: method.params.{sorted(bad)[0]} is not a parameter of {m.divergence!r}; "
            f"valid: {', '.join(DIVERGENCE_PARAMS[m.divergence]) or 'none'}"
        )
    check(cfg, error)  # every field's range, parameters, fields, placeholders, tiny shapes
    source = SOURCES[m.source]
    source.check(cfg, error)
    needs = source.needs(cfg)
    if m.teacher_cache and needs.teacher_cache:
        fixed = ", ".join(n for n, c in SOURCES.items() if c.needs(cfg).teacher_cache is None)
        raise error(f"config error: method.teacher_cache works with method.source={fixed} only (sequences "
                          f"known before training; method.source={m.source} makes new ones)")
    distils = m.divergence != PLAIN and m.kd_ratio > 0
    why = (f"method.divergence={m.divergence} (kd_ratio {m.kd_ratio})" if distils and not m.teacher_cache
           else needs.teacher)
    if why and cfg.teacher is None:
        raise error(f"config error: {why} needs a teacher; set teacher.name")
    _check_instruction_loss(cfg, error)
    _check_lora(cfg, error)
    _check_served(cfg, source, error)
    _check_unused(cfg, error)
    _check_engine(cfg, source, error)
    if m.lm_weight != 1.0 and not m.lm_data:
        raise error(f"config error: method.lm_weight={m.lm_weight} has no effect without method.lm_data "
                          "(the pre-training text it weights)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise error("config error: data.max_prompt_length must be smaller than data.max_length")


def _check_instruction_loss(cfg: Any, error: Callable[[str], Exception]) -> None:
    m = cfg.method
    if m.instruction_weight > 0:
        why = ("needs a teacher forward (not method.teacher_cache)" if m.teacher_cache else
               "needs the teacher to read the student's prompt (method.priming=none)" if m.priming != "none" else
               "is not computed by the chunked head (train.loss_chunk=0)" if cfg.train.loss_chunk else
               "needs a teacher (teacher.name)" if cfg.teacher is None else "")
        if why:
            raise error(f"config error: method.instruction_weight={m.instruction_weight} (the instruction "
                              f"loss) {why}")


def _check_unused(cfg: Any, error: Callable[[str], Exception]) -> None:
    """Keys set to something other than their default that the run would then not use: refused in one line."""
    from switchkd.sections import TeacherConfig

    if not cfg.output.hub_private and not cfg.output.push_to_hub:
        raise error("config error: output.hub_private=false applies to output.push_to_hub, which is not set")
    if cfg.teacher is not None and not cfg.teacher.server:
        defaults = TeacherConfig(name="x")
        for key in ("top_k", "timeout", "retries"):
            if getattr(cfg.teacher, key) != getattr(defaults, key):
                raise error(f"config error: teacher.{key}={getattr(cfg.teacher, key)!r} applies to a teacher on a vLLM "
                            "server (teacher.server=URL), which is not set")


def _check_served(cfg: Any, source: Any, error: Callable[[str], Exception]) -> None:
    """A teacher on a vLLM server (``teacher.server``): the divergence must be defined on its top-k log-probabilities
    (:data:`SERVED_DIVERGENCES`) and the source must not run the teacher step by step."""
    if cfg.teacher is None or not cfg.teacher.server:
        return
    m, k = cfg.method, cfg.teacher.top_k
    url = f"teacher.server={cfg.teacher.server}"
    if not str(cfg.teacher.server).startswith(("http://", "https://")):
        raise error(f"config error: {url}: expected an http:// or https:// URL (e.g. http://127.0.0.1:8000)")
    if m.teacher_cache:
        raise error(f"config error: {url} and method.teacher_cache both give the teacher's targets; set one")
    how = SERVED_DIVERGENCES.get(m.divergence)
    if m.kd_ratio > 0 and how is None:
        valid = ", ".join(n for n in SERVED_DIVERGENCES if n != PLAIN)
        raise error(f"config error: method.divergence={m.divergence} is not defined on a served teacher's top-k "
                    f"log-probabilities ({url}); use one of {valid}")
    if how == "bucket" and m.kd_ratio > 0 and m.temperature != 1.0:
        raise error(f"config error: method.temperature={m.temperature} with {url}: the server's top-k "
                    "log-probabilities are at temperature 1 (set method.temperature=1)")
    if how == "top" and int(m.params.get("k", 50)) > k:
        raise error(f"config error: method.params.k={int(m.params.get('k', 50))} is larger than teacher.top_k={k} "
                    "(the log-probabilities the server returns per position); raise teacher.top_k")
    if m.instruction_weight > 0:
        raise error(f"config error: method.instruction_weight={m.instruction_weight} needs the teacher's full "
                    f"distributions on the prompt; it does not work with {url}")
    why = source.needs(cfg).served_teacher
    if why:
        raise error(f"config error: method.source={m.source} with {url}: {why}")


def _check_engine(cfg: Any, source: Any, error: Callable[[str], Exception]) -> None:
    """``method.decoding.engine=vllm``: the source's rollouts must be the student's own samples."""
    if cfg.method.decoding.engine != "vllm":
        return
    why = source.needs(cfg).vllm
    if why:
        raise error(f"config error: method.decoding.engine=vllm: method.source={cfg.method.source} {why}; "
                    "use method.decoding.engine=switchkd")


def _check_lora(cfg: Any, error: Callable[[str], Exception]) -> None:
    lora = cfg.model.lora
    if cfg.teacher is not None and cfg.teacher.lora.r:
        raise error("config error: teacher.lora: the teacher is frozen; load a LoRA-tuned teacher with teacher.adapter")
    if cfg.output.merge and not lora.r:
        raise error("config error: output.merge=true needs a LoRA student (model.lora.r > 0)")
    if lora.target_modules is not None and not lora.r:
        raise error("config error: model.lora.target_modules is set but model.lora.r is 0 (LoRA off: the whole "
                          "model would train); set model.lora.r, e.g. 16")
    if lora.target_modules is not None and not lora.target_modules:
        raise error("config error: model.lora.target_modules=[] adapts nothing; name modules (e.g. [q_proj, "
                          "v_proj]) or leave it unset for every linear layer")
    if lora.r > 4096:
        raise error(f"config error: model.lora.r={lora.r}: expected a rank much smaller than the model's width "
                          "(typically 8-64)")


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
