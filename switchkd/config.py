"""The configuration tree: dataclasses, YAML presets and ``dotted.key=value`` overrides.

Loading and merging is OmegaConf's (structured configs): an unknown key or a
wrongly typed value raises :class:`ConfigError` with a one-line message naming
the key and what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped presets (configs/<family>/<name>.yaml)


class ConfigError(ValueError):
    """A user mistake in a config file or override (message is one line)."""


@dataclass
class LoraConfig:
    """LoRA through peft for the student; off while ``r`` is 0."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # None: every linear layer but the LM head (peft's "all-linear")


@dataclass
class ModelConfig:
    """A causal LM: hub id, local directory, or ``tiny:gpt2`` / ``tiny:llama[,key=value...]``."""

    name: str = "tiny:gpt2"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    tokenizer: Optional[str] = None  # defaults to ``name``
    revision: Optional[str] = None
    adapter: Optional[str] = None  # a peft LoRA adapter directory: loaded onto the model and merged
    lora: LoraConfig = field(default_factory=LoraConfig)  # student only


@dataclass
class DataConfig:
    """Instruction data (local JSON/JSONL/parquet, a hub dataset id, or ``synthetic``)."""

    train: str = "synthetic"
    dev: Optional[str] = None
    format: str = "auto"  # auto | minillm | dolly | messages
    fields: Dict[str, str] = field(default_factory=dict)  # e.g. {instruction: question}
    template: str = "alpaca"  # alpaca | chat | none, or a string with {instruction} and {input}
    max_prompt_length: int = 256
    max_length: int = 512
    limit: Optional[int] = None
    synthetic_size: int = 2000
    seed: int = 0


@dataclass
class SwitchConfig:
    """SWITCH (``source: switch``): the teacher writes where gate(p, q) > tau_t, tau_t = tau0 * exp(-decay * t)."""

    tau0: float = 0.1  # chosen on the synthetic dev split (docs/results.md); see switchkd calibrate
    decay: float = 0.1
    schedule: str = "exp"  # exp | linear | const
    gate: str = "jsd"  # jsd | fkl | rkl | tvd
    ratio: float = 1.0  # probability a batch is SWITCH-generated, else the dataset's
    speculative: bool = True  # rollouts by draft-and-verify (same tokens as lockstep in fp32 greedy)
    draft_k: int = 4  # first draft length; later ones from the measured rejection rate
    max_draft_k: int = 16


@dataclass
class MixtureConfig:
    """GKD (``source: mixture``)."""

    student_ratio: float = 0.5  # lambda: probability a batch is student-generated
    seq_kd: bool = False  # TRL's seq_kd: the other batches are teacher samples instead of the dataset


@dataclass
class SkdConfig:
    """SKD (``source: skd``; Xu et al., ICLR 2025)."""

    top_k: int = 25  # the teacher replaces a student token outside its top K (the paper's K)


@dataclass
class ImitkdConfig:
    """ImitKD (``source: imitkd``; Lin et al. 2020, asappresearch/imitkd's configs)."""

    schedule: str = "exponential"  # exponential: beta_t = base^(-t/N) (every official config) | linear: 1 - t/(N-1)
    base: float = 200.0  # 200 in the translation configs, 10 in the summarisation ones
    targets: str = "full"  # full ("ImitKD+Full": teacher distribution on every row) | argmax ("ImitKD")


@dataclass
class DistillmConfig:
    """DistiLLM's adaptive off-policy sampling (``source: distillm``; official finetune.py's rules and defaults)."""

    replay_size: int = 1000  # --capacity
    replay_schedule: str = "decreasing"  # --replay-ratio: fresh-sample share decreasing | constant | increasing
    replay_ratio: float = 0.5  # the fresh-sample share under replay_schedule=constant
    init_student_prob: float = 0.0  # --init-threshold
    max_student_prob: float = 1.0
    student_prob_step: float = 0.1
    loss_eps: float = 0.1  # --loss-eps: p rises when the dev CE is >= reference + loss_eps
    validate: str = "epoch"  # epoch: dev CE after each epoch (official) | eval_every: at each train.eval_every
    dev_limit: int = 1000  # --dev-num: dev examples whose CE drives p (the mean of per-batch means, as official)


@dataclass
class MinillmConfig:
    """MiniLLM (``source: minillm``; microsoft/LMOps minillm's rules, its GPT-2 scripts' settings)."""

    teacher_mix: float = 0.2  # --teacher-mixed-alpha: sample from alpha p_teacher + (1 - alpha) q_student
    gamma: float = 0.95  # --gamma: discount of the reward-to-go
    length_norm: str = "count"  # count (LMOps --length-norm) | discounted (TRL) | none
    whiten: bool = True  # LMOps whitens the advantages over the batch
    reward_scale: float = 0.5  # --reward-scaling: rewards divided by it
    reward_clip: float = 100.0  # --cliprange-reward
    clip: float = 0.2  # --cliprange (PPO ratio clipping)
    ppo_epochs: int = 4  # --ppo-epochs: each rollout batch is trained on this many times


@dataclass
class MethodConfig:
    """Which sequences we train on x which per-token loss; per-source settings in their own sections."""

    name: str = "sft"  # a label only (logs, reports): behaviour comes from source, divergence and their parameters
    source: str = "dataset"  # dataset | teacher | student | imitkd | mixture | distillm | switch | minillm | skd
    divergence: str = "ce"  # a divergence from the registry; "ce" = cross-entropy on the sequences alone
    params: Dict[str, float] = field(default_factory=dict)  # divergence parameters
    temperature: float = 1.0
    kd_ratio: float = 1.0  # loss = kd_ratio * divergence + (1 - kd_ratio) * CE
    # rollouts (every source that decodes)
    max_new_tokens: int = 128
    do_sample: bool = True
    gen_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    compile: str = "auto"  # static KV caches + compiled decode step: auto (on CUDA) | true | false
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    imitkd: ImitkdConfig = field(default_factory=ImitkdConfig)
    skd: SkdConfig = field(default_factory=SkdConfig)
    distillm: DistillmConfig = field(default_factory=DistillmConfig)
    minillm: MinillmConfig = field(default_factory=MinillmConfig)
    instruction_weight: float = 0.0  # BiLD's instruction loss: + weight x forward KL (T = 1) on the prompt tokens
    # the LM loss on pre-training text that DistiLLM and MiniLLM add (--lm-data-dir, --lm-coef)
    lm_data: Optional[str] = None  # .txt (documents split by blank lines) or .jsonl/.json/.parquet with "text"
    lm_weight: float = 1.0  # --lm-coef (official default 1): objective += lm_weight x mean CE on a text batch
    # response priming (teacher-only prompt prefix)
    priming: str = "none"  # none | teacher | ground_truth | confidence | custom text
    teacher_cache: Optional[str] = None  # a switchkd cache-teacher directory (dataset source only)


#: earlier flat ``method.*`` keys -> their place in the per-source sections (still read, with a warning)
MOVED = {"tau0": "switch.tau0", "decay": "switch.decay", "schedule": "switch.schedule", "gate": "switch.gate",
         "switch_ratio": "switch.ratio", "speculative": "switch.speculative", "draft_k": "switch.draft_k",
         "max_draft_k": "switch.max_draft_k", "student_ratio": "mixture.student_ratio", "seq_kd": "mixture.seq_kd",
         **{k: f"distillm.{k}" for k in ("replay_size", "replay_schedule", "replay_ratio", "init_student_prob",
                                        "max_student_prob", "student_prob_step", "loss_eps")}}


@dataclass
class TrainConfig:
    """Optimisation and loop settings (DistiLLM's defaults where they exist)."""

    lr: float = 5e-4
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    warmup_steps: int = 0
    scheduler: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    loss_chunk: int = 0  # >0: LM head + divergence over this many response tokens at a time (bounded memory)
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    save_every: int = 0  # optimizer steps; 0 = no intermediate checkpoints
    keep_best: bool = True
    resume: bool = False
    log_every: int = 10
    loggers: List[str] = field(default_factory=list)  # tensorboard | wandb
    gradient_checkpointing: bool = False  # the student's activations recomputed in backward (less memory)


@dataclass
class EvalConfig:
    """Generation and ROUGE-L scoring (MiniLLM/DistiLLM protocol by default)."""

    seeds: List[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_length: int = 512
    max_prompt_length: int = 256
    max_new_tokens: Optional[int] = None
    batch_size: int = 16
    limit: Optional[int] = None
    buckets: List[int] = field(default_factory=lambda: [5, 10, 20, 40, 80])
    metric: str = "rougeL"  # rougeL | accuracy (final answer: GSM8K's "#### N", else the last number)


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    merge: bool = False  # with model.lora: final/ (and best/) also hold the merged model plain transformers loads
    overwrite: bool = False  # replace a finished or interrupted run in dir (else refused unless train.resume)


@dataclass
class Config:
    """The whole run: student ``model``, ``teacher``, ``data``, ``method``, ``train``, ``eval``, ``output``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


CHOICES: Dict[str, Sequence[str]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "teacher.dtype": ("float32", "bfloat16", "float16"),
    "data.format": ("auto", "minillm", "dolly", "messages"),
    "method.source": ("dataset", "teacher", "student", "imitkd", "mixture", "distillm", "switch", "minillm", "skd"),
    "method.minillm.length_norm": ("count", "discounted", "none"),
    "method.imitkd.schedule": ("exponential", "linear"),
    "method.distillm.validate": ("epoch", "eval_every"),
    "method.imitkd.targets": ("full", "argmax"),
    "method.switch.schedule": ("exp", "linear", "const"),
    "method.switch.gate": ("jsd", "fkl", "rkl", "tvd"),
    "method.distillm.replay_schedule": ("decreasing", "constant", "increasing"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "eval.metric": ("rougeL", "accuracy"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0].strip()
    return f"{key}: {msg}" if key else msg


def _valid_keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else "?"


def _check_unknown(raw: Dict[str, Any], schema: Any, where: str, prefix: str = "") -> None:
    """Reject keys that the dataclass tree does not have, listing the valid ones."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{full}'; valid keys here: {_valid_keys(schema)}")
        sub = getattr(schema, key) if not isinstance(schema, type) else None
        sub_type = sub if dataclasses.is_dataclass(sub) else _dataclass_type(names[key])
        if sub_type is not None and isinstance(value, dict):
            _check_unknown(value, sub_type, where, full + ".")


def _warn_moved(where: str, old: str) -> None:
    import sys

    print(f"switchkd: warning: {where}: method.{old} is now method.{MOVED[old]}", file=sys.stderr)


def _moved_in_file(raw: Dict[str, Any], where: str) -> None:
    """Move earlier flat ``method`` keys of a config file into their sections (with a warning)."""
    method = raw.get("method")
    if not isinstance(method, dict):
        return
    for old in [k for k in method if k in MOVED]:
        section, key = MOVED[old].split(".")
        if not isinstance(method.setdefault(section, {}), dict):
            return  # a malformed section: reported by the type checks
        method[section].setdefault(key, method.pop(old))
        _warn_moved(where, old)


def _moved_override(item: str) -> str:
    """``method.tau0=x`` -> ``method.switch.tau0=x`` (with a warning)."""
    key, _, value = item.partition("=")
    if key.startswith("method.") and key[len("method."):] in MOVED:
        _warn_moved(f"override '{item}'", key[len("method."):])
        return f"method.{MOVED[key[len('method.'):]]}={value}"
    return item


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
    if f.name == "teacher":
        return ModelConfig()
    return None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults, the YAML file at ``path`` and ``key=value`` overrides into a :class:`Config`."""
    base = OmegaConf.structured(Config)
    layers = []  # (where, layer)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            hint = "" if path.suffix in (".yaml", ".yml") or path.exists() else \
                "; not a preset either (switchkd presets lists them, e.g. tiny/kd)"
            raise ConfigError(f"{path}: config file not found{hint}")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        except Exception as exc:  # YAML syntax errors carry line numbers
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _moved_in_file(raw, str(path))
        _check_unknown(raw, Config(), str(path))
        _check_raw(raw, str(path))
        layers.append((str(path), OmegaConf.create(raw)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        item = _moved_override(item)
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
            merged.teacher = OmegaConf.merge(OmegaConf.structured(ModelConfig), merged.teacher)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"config error: {_one_line(exc) if isinstance(exc, OmegaConfBaseException) else exc}") from None
    if str(cfg.train.mixed_precision).lower() == "false":  # YAML reads a bare `no` as a boolean
        cfg.train.mixed_precision = "no"
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check choice-valued fields and cross-field rules; raise :class:`ConfigError`."""
    for dotted, choices in CHOICES.items():
        *path, key = dotted.split(".")
        node: Any = cfg
        for part in path:
            node = getattr(node, part) if node is not None else None
        if node is None:
            continue
        value = getattr(node, key)
        if value not in choices:
            raise ConfigError(f"config error: {dotted}={value!r}; valid choices: {', '.join(choices)}")
    from switchkd.checks import DIVERGENCE_PARAMS as PARAMS

    DIVERGENCES = list(PARAMS)

    m = cfg.method
    if m.divergence not in DIVERGENCES:
        raise ConfigError(f"config error: method.divergence={m.divergence!r}; valid choices: {', '.join(DIVERGENCES)}")
    bad = set(m.params) - set(PARAMS[m.divergence])
    if bad:
        raise ConfigError(
            f"config error: method.params.{sorted(bad)[0]} is not a parameter of {m.divergence!r}; "
            f"valid: {', '.join(PARAMS[m.divergence]) or 'none'}"
        )
    from switchkd.checks import check

    check(cfg, ConfigError)  # every numeric field's range, parameters, fields, placeholders, tiny shapes
    if m.source == "distillm" and not cfg.data.dev:
        raise ConfigError("config error: method.source=distillm needs data.dev: its student-data probability rises "
                          "only when the dev loss does (set data.dev; it is measured after each epoch, or at each "
                          "train.eval_every with method.distillm.validate=eval_every)")
    if m.source == "minillm" and (m.instruction_weight > 0 or m.priming != "none"):
        raise ConfigError("config error: method.source=minillm works with method.instruction_weight=0 and "
                          "method.priming=none (its rewards need the teacher on the student's own prompt)")
    if m.source == "imitkd" and m.imitkd.targets == "argmax" and (m.divergence != "ce" and m.kd_ratio > 0):
        raise ConfigError("config error: method.imitkd.targets=argmax (the paper's ImitKD) trains by cross-entropy on "
                          "the teacher's argmax tokens: set method.divergence=ce (or method.kd_ratio=0)")
    if m.teacher_cache and m.source != "dataset":
        raise ConfigError("config error: method.teacher_cache works with method.source=dataset only")
    distils = m.divergence != "ce" and m.kd_ratio > 0
    argmax = m.source == "imitkd" and m.imitkd.targets == "argmax"
    if argmax and m.priming != "none":
        raise ConfigError("config error: method.imitkd.targets=argmax labels the student's own sequences with the "
                          "teacher's argmax; it works with method.priming=none")
    needs_teacher = (distils or argmax or m.source in ("teacher", "switch", "minillm", "skd") or (m.source == "mixture" and m.mixture.seq_kd)) \
        and not m.teacher_cache
    if needs_teacher and cfg.teacher is None:
        why = f"method.divergence={m.divergence} (kd_ratio {m.kd_ratio})" if distils else f"method.source={m.source}"
        raise ConfigError(f"config error: {why} needs a teacher; set teacher.name")
    if m.instruction_weight > 0:
        why = ("needs a teacher forward (not method.teacher_cache)" if m.teacher_cache else
               "needs the teacher to read the student's prompt (method.priming=none)" if m.priming != "none" else
               "is not computed by the chunked head (train.loss_chunk=0)" if cfg.train.loss_chunk else
               "needs a teacher (teacher.name)" if cfg.teacher is None else "")
        if why:
            raise ConfigError(f"config error: method.instruction_weight={m.instruction_weight} (BiLD's instruction loss) {why}")
    if str(m.compile).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"config error: method.compile={m.compile!r}; valid choices: auto, true, false")
    lora = cfg.model.lora
    if cfg.teacher is not None and cfg.teacher.lora.r:
        raise ConfigError("config error: teacher.lora: the teacher is frozen; load a LoRA-tuned teacher with teacher.adapter")
    if cfg.output.merge and not lora.r:
        raise ConfigError("config error: output.merge=true needs a LoRA student (model.lora.r > 0)")
    if lora.target_modules is not None and not lora.r:
        raise ConfigError("config error: model.lora.target_modules is set but model.lora.r is 0 (LoRA off: the whole "
                          "model would train); set model.lora.r, e.g. 16")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("config error: model.lora.target_modules=[] adapts nothing; name modules (e.g. [q_proj, "
                          "v_proj]) or leave it unset for every linear layer")
    if lora.r > 4096:
        raise ConfigError(f"config error: model.lora.r={lora.r}: expected a rank much smaller than the model's width "
                          "(typically 8-64)")
    if m.lm_weight != 1.0 and not m.lm_data:
        raise ConfigError(f"config error: method.lm_weight={m.lm_weight} has no effect without method.lm_data "
                          "(the pre-training text it weights)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError("config error: data.max_prompt_length must be smaller than data.max_length")


def preset_method(name: str) -> List[str]:
    """The ``method`` section of the preset ``name`` (e.g. ``tiny/switch``) as ``method.key=value``
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
