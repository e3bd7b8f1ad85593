"""The configuration tree: dataclasses, YAML presets and ``dotted.key=value`` overrides.

Loading and merging is OmegaConf's (structured configs): an unknown key or a
wrongly typed value raises :class:`ConfigError` with a one-line message naming
the key and what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from switchkd.checks import DIVERGENCE_PARAMS, PLAIN
from switchkd.methods import SECTIONS, SOURCES
from switchkd.schema import COUNT, COUNT0, PROB, entries, gt, opt
from switchkd.sections import (  # noqa: F401  (the shared sections: switchkd.config's public names)
    DTYPES,
    ENGINES,
    ConfigError,
    DataConfig,
    DecodingConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RolloutDecodingConfig,
    TeacherConfig,
    TrainConfig,
    decoding_of,
)

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped presets (configs/<family>/<name>.yaml)


@dataclass
class _MethodFields:
    """Which sequences we train on x which per-token loss; each source's settings in its own section."""

    name: str = opt("sft", "a label only (logs, reports): behaviour comes from source, divergence and parameters")
    source: str = opt("dataset", "which sequences a batch holds (one module of switchkd.methods each)",
                      choices=lambda: tuple(SOURCES))
    divergence: str = opt(PLAIN, f"the per-token loss from the divergence registry ({PLAIN}: cross-entropy on the "
                          "sequences alone, no teacher)", choices=lambda: tuple(DIVERGENCE_PARAMS))
    params: Dict[str, float] = opt(factory=dict, help="the divergence's parameters (e.g. {alpha: 0.1}, {k: 8})")
    temperature: float = opt(1.0, "the divergence's temperature", rule=gt(0))
    kd_ratio: float = opt(1.0, "loss = kd_ratio x divergence + (1 - kd_ratio) x CE", rule=PROB)
    max_new_tokens: int = opt(128, "response tokens a training rollout may decode", rule=COUNT)
    decoding: RolloutDecodingConfig = opt(factory=RolloutDecodingConfig, help="how training rollouts sample")
    compile: str = opt("auto", "static KV caches + a compiled one-token decode step: auto (on CUDA), true, false",
                       rule=((lambda v: str(v).lower() in ("auto", "true", "false")), "auto, true or false"))
    instruction_weight: float = opt(0.0, "an instruction loss (Li et al. 2024): + weight x forward KL (T = 1) on the prompt "
                                    "tokens", rule=COUNT0)
    lm_data: Optional[str] = opt(None, "pre-training text for an extra LM loss: .txt (documents split by blank "
                                 "lines) or .jsonl/.json/.parquet with text")
    lm_weight: float = opt(1.0, "objective += lm_weight x mean CE on a packed text batch per micro-batch",
                           rule=COUNT0)
    priming: str = opt("none", "response priming: a teacher-only prompt prefix (none, teacher, ground_truth, "
                       "confidence, or custom text with {reference})")
    cross_tokenizer: str = opt("auto", "a teacher with another vocabulary: auto (gold when the vocabularies "
                               "differ), off (refused), uld (sorted-probability L1), gold (exact on shared tokens + "
                               "ULD on the rest); replaces the divergence term", choices=("auto", "off", "uld", "gold"))
    cross_beta: float = opt(0.5, "gold: the generalized Jensen-Shannon divergence's beta over the tokens both "
                            "vocabularies share", rule=PROB)
    cross_merge: str = opt("bayesian", "how a group of tokens' distributions merge into one: bayesian (the last "
                           "position's) or observed (the first position's), times the group's other tokens' "
                           "probabilities", choices=("bayesian", "observed"))
    teacher_cache: Optional[str] = opt(None, "a switchkd cache-teacher directory: the teacher's top-k targets from "
                                       "disk, no teacher loaded (sources with fixed sequences only)")


#: ``method``: the shared fields plus one section per method module that declares one (``method.<section>``)
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig", [(name, section, opt(factory=section, help=(section.__doc__ or "").strip().split("\n")[0]))
                     for name, section in SECTIONS.items()], bases=(_MethodFields,))
MethodConfig.__module__ = __name__
MethodConfig.__doc__ = _MethodFields.__doc__


@dataclass
class Config:
    """The whole run: student ``model``, ``teacher``, ``data``, ``method``, ``train``, ``eval``, ``output``."""

    model: ModelConfig = opt(factory=ModelConfig, help="the student")
    teacher: Optional[TeacherConfig] = opt(None, "the teacher (frozen; its own vocabulary: method.cross_tokenizer; "
                                         "or on a vLLM server: teacher.server)", section=TeacherConfig)
    data: DataConfig = opt(factory=DataConfig)
    method: MethodConfig = opt(factory=MethodConfig)  # type: ignore[valid-type]
    train: TrainConfig = opt(factory=TrainConfig)
    eval: EvalConfig = opt(factory=EvalConfig)
    output: OutputConfig = opt(factory=OutputConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0].strip()
    return f"{key}: {msg}" if key else msg


def _valid_keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else "?"


def _elsewhere(key: str, schema: Any, prefix: str) -> str:
    """`` (did you mean model.lora.r?)`` when a section below ``schema`` has a field ``key``."""
    found = [f"{prefix}{e.key}" for e in entries(type(schema)) if e.key.rsplit(".", 1)[-1] == key]
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _check_unknown(raw: Dict[str, Any], schema: Any, where: str, prefix: str = "") -> None:
    """Reject keys that the dataclass tree does not have, listing the valid ones."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{full}'{_elsewhere(key, schema, prefix)}; valid keys here: "
                              f"{_valid_keys(schema)}")
        sub = getattr(schema, key) if not isinstance(schema, type) else None
        sub_type = sub if dataclasses.is_dataclass(sub) else _dataclass_type(names[key])
        if sub_type is not None and isinstance(value, dict):
            _check_unknown(value, sub_type, where, full + ".")


def _check_raw(raw: Dict[str, Any], where: str) -> None:
    """Rules OmegaConf's coercion would hide: ``data.fields`` values must be strings as written."""
    fields = (raw.get("data") or {}).get("fields") if isinstance(raw.get("data"), dict) else None
    if isinstance(fields, dict):
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}: data.fields.{key}={value!r}; expected the name of a field in your data")


def _dataclass_type(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        val = f.default_factory()  # type: ignore[misc]
        return val if dataclasses.is_dataclass(val) else None
    section = f.metadata.get("section")
    return section() if section is not None else None


def _file_layers(path: Path, chain: tuple = ()) -> List[tuple]:
    """The layers of a config file: those of its ``base:`` file first (a path relative to it, itself a
    config file that may have a base), then its own keys."""
    if not path.is_file():
        hint = "" if path.suffix in (".yaml", ".yml") or path.exists() else \
            "; not a preset either (switchkd presets lists them, e.g. tiny/kd)"
        raise ConfigError(f"{chain[-1] if chain else path}: config file {path} not found{hint}" if chain else
                          f"{path}: config file not found{hint}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # YAML syntax errors carry line numbers
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: the config file is empty; expected sections such as model, teacher, data, "
                          "method (see switchkd presets)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    layers: List[tuple] = []
    if "base" in raw:
        base = raw.pop("base")
        if not isinstance(base, str) or path.resolve() in chain:
            raise ConfigError(f"{path}: base must name another config file (no cycles), got {base!r}")
        layers = _file_layers(path.parent / base, chain + (path.resolve(),))
    _check_unknown(raw, Config(), str(path))
    _check_raw(raw, str(path))
    return layers + [(str(path), OmegaConf.create(raw))]


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults, the YAML file at ``path`` (after its ``base:`` file, if it names one) and
    ``key=value`` overrides into a :class:`Config`."""
    base = OmegaConf.structured(Config)
    layers = []  # (where, layer)
    if path is not None:
        layers += _file_layers(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        try:
            raw = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except Exception as exc:  # e.g. an unbalanced bracket in the value
            raise ConfigError(f"override '{item}': cannot parse the value ({str(exc).splitlines()[0]})") from None
        _check_unknown(raw, Config(), f"override '{item}'")
        _check_raw(raw, f"override '{item}'")
        layers.append((f"override '{item}'", OmegaConf.create(raw)))
    merged = base
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            msg = _one_line(exc) if isinstance(exc, OmegaConfBaseException) else str(exc).splitlines()[0]
            raise ConfigError(f"{where}: {msg}") from None
    try:
        if merged.teacher is not None:
            merged.teacher = OmegaConf.merge(OmegaConf.structured(TeacherConfig), merged.teacher)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"config error: {_one_line(exc) if isinstance(exc, OmegaConfBaseException) else exc}") from None
    if str(cfg.train.mixed_precision).lower() == "false":  # YAML reads a bare `no` (or `off`) as a boolean
        cfg.train.mixed_precision = "no"
    if str(cfg.method.cross_tokenizer).lower() == "false":
        cfg.method.cross_tokenizer = "off"
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check choices, ranges and cross-field rules (each method's own included); raise :class:`ConfigError`."""
    from switchkd.checks import validate as check_all

    check_all(cfg, ConfigError)


def preset_method(name: str) -> List[str]:
    """The ``method`` section of the preset ``name`` (e.g. ``tiny/kd``) as ``method.key=value``
    overrides, so that a preset's method can be laid over another run's model, data and budget."""
    raw = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{name}.yaml"), resolve=True) or {}

    def flat(prefix: str, node: Any) -> List[str]:
        if isinstance(node, dict):
            return [x for k, v in node.items() for x in flat(f"{prefix}.{k}", v)]
        value = "null" if node is None else str(node).lower() if isinstance(node, bool) else node
        return [f"{prefix}={value}"]

    return flat("method", raw.get("method") or {})


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


if __name__ == "__main__":  # python -m switchkd.config: the reference table of docs/configuration.md
    from switchkd.schema import markdown

    print(markdown(Config), end="")
