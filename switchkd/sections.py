"""The configuration sections every module may import: :class:`ConfigError` and the dataclasses of the shared
sections (``model``, ``teacher``, ``data``, decoding, ``train``, ``eval``, ``output``).

A leaf of the package's import graph: it imports only the schema helpers and the record formats, so the engine,
the losses and the method modules read these without importing :mod:`switchkd.config`, which composes the whole
tree (the ``method`` section from the method registry) and loads YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from switchkd.records import FORMATS
from switchkd.schema import COUNT, COUNT0, SEED, ge, gt, in_range, opt, optional

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A user mistake in a config file or override (message is one line)."""


@dataclass
class LoraConfig:
    """``model.lora``: LoRA through peft for the student; off while ``r`` is 0."""

    r: int = opt(0, "LoRA rank (0: off, the whole model trains)", rule=COUNT0)
    alpha: float = opt(16.0, "LoRA scaling alpha", rule=gt(0))
    dropout: float = opt(0.0, "dropout on the LoRA branch", rule=in_range(0.0, 1.0, hi_open=True))
    target_modules: Optional[List[str]] = opt(None, "modules to adapt (null: every linear layer but the LM head, "
                                              "peft's all-linear)")


@dataclass
class ModelConfig:
    """A causal LM: hub id, local directory, or ``tiny:gpt2`` / ``tiny:llama[,key=value...]``."""

    name: str = opt("tiny:gpt2", "hub id, local directory, or tiny:gpt2 / tiny:llama[,layers=,dim=,heads=,kv_heads=,"
                    "ffn=,positions=,seed=] (random weights, byte-level tokenizer, no download)")
    dtype: str = opt("float32", "the weights' dtype", choices=DTYPES)
    tokenizer: Optional[str] = opt(None, "the tokenizer's source (default: name); a teacher's other "
                                   "vocabulary is distilled across (method.cross_tokenizer)")
    revision: Optional[str] = opt(None, "hub revision")
    adapter: Optional[str] = opt(None, "a peft LoRA adapter directory, loaded onto the model and merged")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA for the student (the teacher is frozen)")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a :class:`ModelConfig`, or a model on a vLLM server (``server``) that the run queries instead of
    loading it (``name`` then names its tokenizer and, for ``switchkd serve-teacher``, the model served)."""

    server: Optional[str] = opt(None, "URL of a vLLM OpenAI-compatible server holding the teacher (switchkd "
                                "serve-teacher): targets are its top_k log-probabilities + a tail bucket, no teacher "
                                "in the training processes")
    top_k: int = opt(20, "teacher.server: log-probabilities per position (at most the server's --max-logprobs)",
                     rule=COUNT)
    timeout: float = opt(300.0, "teacher.server: seconds a request may take before it is retried", rule=gt(0))
    retries: int = opt(5, "teacher.server: attempts of a request that failed for a transient reason (unreachable, "
                       "reset, timed out, HTTP 5xx), 1, 2, 4, 8, ... s apart; then the run stops in one line",
                       rule=COUNT)


@dataclass
class DataConfig:
    """Instruction data (local JSON/JSONL/parquet, a hub dataset id, or ``synthetic``)."""

    train: str = opt("synthetic", ".jsonl/.json/.parquet, a hub dataset id[:split], or a built-in suite "
                     "(synthetic[:split], arith[:split])")
    dev: Optional[str] = opt(None, "the dev set (same forms as train): dev loss, dev ROUGE-L, best checkpoint")
    format: str = opt("auto", "record format (auto: detected from the fields)", choices=lambda: ("auto", *FORMATS))
    fields: Dict[str, str] = opt(factory=dict, help="canonical field -> your field's name, e.g. {instruction: question}")
    template: str = opt("auto", "prompt template: auto (chat when the tokenizer has a chat template, else alpaca), "
                        "alpaca, chat (the tokenizer's chat template), none, or a string with {instruction} and {input}")
    max_prompt_length: int = opt(256, "longer prompts are dropped (their count is printed)", rule=COUNT)
    max_length: int = opt(512, "prompt + response tokens; longer responses are cut", rule=ge(2))
    limit: Optional[int] = opt(None, "use the first N examples", rule=optional(COUNT))
    synthetic_size: int = opt(2000, "examples in a built-in suite's train split", rule=COUNT)
    seed: int = opt(0, "the built-in suites' seed", rule=SEED)


@dataclass
class DecodingConfig:
    """How responses are sampled: by training rollouts (``method.decoding``), by evaluation (``eval``, which
    extends it) and by the rollout engine (:class:`switchkd.decoding.RolloutConfig` extends it too)."""

    do_sample: bool = opt(True, "sample (false: greedy)")
    temperature: float = opt(1.0, "sampling temperature", rule=gt(0))
    top_k: int = opt(0, "top-k sampling (0: off)", rule=COUNT0)
    top_p: float = opt(1.0, "nucleus sampling", rule=in_range(0.0, 1.0, lo_open=True))


ENGINES = ("switchkd", "vllm")


@dataclass
class RolloutDecodingConfig(DecodingConfig):
    """``method.decoding``: how training rollouts sample, and which engine decodes them."""

    engine: str = opt("switchkd", "the student's rollouts: switchkd (the built-in KV-cached engine) or vllm (a vLLM "
                      "engine in the training process holding the student's current weights)", choices=ENGINES)


def decoding_of(cfg: Any) -> Dict[str, Any]:
    """The :class:`DecodingConfig` fields of ``cfg`` (a DecodingConfig, EvalConfig or RolloutConfig) by name."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DecodingConfig)}


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    lr: float = opt(5e-4, "AdamW's learning rate", rule=gt(0))
    batch_size: int = opt(8, "sequences per process per micro-batch", rule=COUNT)
    grad_accum: int = opt(1, "micro-batches per optimizer step", rule=COUNT)
    epochs: int = opt(1, "passes over data.train", rule=COUNT)
    max_steps: Optional[int] = opt(None, "optimizer steps (overrides epochs)", rule=optional(COUNT))
    warmup_steps: int = opt(0, "linear warm-up steps", rule=COUNT0)
    scheduler: str = opt("cosine", "the learning-rate schedule", choices=("cosine", "linear", "constant"))
    weight_decay: float = opt(0.01, "AdamW's weight decay (none on 1-D parameters)", rule=COUNT0)
    betas: List[float] = opt(factory=lambda: [0.9, 0.999], help="AdamW's (beta1, beta2)",
                             rule=((lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v)),
                                   "two numbers in [0, 1)"))
    clip: float = opt(1.0, "gradient-norm clipping (0: off)", rule=COUNT0)
    seed: int = opt(1, "the run's seed", rule=SEED)
    mixed_precision: str = opt("no", "autocast", choices=("no", "bf16", "fp16"))
    loss_chunk: int = opt(0, ">0: the LM head and the divergence over this many response tokens at a time "
                          "(bounded memory, same loss)", rule=COUNT0)
    eval_every: int = opt(0, "optimizer steps between dev evaluations (0: only at the end)", rule=COUNT0)
    save_every: int = opt(0, "optimizer steps between checkpoints (0: none)", rule=COUNT0)
    dev_rouge: int = opt(64, "dev prompts scored by greedy ROUGE-L at each dev evaluation (the first N of the dev set; "
                         "0: dev loss only, and the best checkpoint is the lowest dev loss)", rule=COUNT0)
    keep_best: bool = opt(True, "final/ is the checkpoint with the best dev ROUGE-L (train.dev_rouge=0: dev loss)")
    resume: bool = opt(False, "continue from the newest readable checkpoint in output.dir")
    log_every: int = opt(10, "optimizer steps between log lines", rule=COUNT)
    loggers: List[str] = opt(factory=list, help="tensorboard and/or wandb (when installed)")
    gradient_checkpointing: bool = opt(False, "recompute the student's activations in backward (less memory)")


@dataclass
class EvalConfig(DecodingConfig):
    """Generation (the :class:`DecodingConfig` fields) and ROUGE-L scoring (the community protocol of Gu et
    al. 2024 and Ko et al. 2024 by default; greedy is one pass)."""

    seeds: List[int] = opt(factory=lambda: [10, 20, 30, 40, 50], help="sampling seeds (the protocol's five)")
    max_length: int = opt(512, "prompt + response tokens", rule=ge(2))
    max_prompt_length: int = opt(256, "longer prompts keep their last tokens", rule=COUNT)
    max_new_tokens: Optional[int] = opt(None, "response tokens (default: max_length - prompt)", rule=optional(COUNT))
    batch_size: int = opt(16, "prompts per generation batch", rule=COUNT)
    limit: Optional[int] = opt(None, "the first N examples of each set", rule=optional(COUNT))
    buckets: List[int] = opt(factory=lambda: [5, 10, 20, 40, 80], help="reference-length buckets in words")
    metric: str = opt("rougeL", "rougeL, or accuracy of the final answer (GSM8K's '#### N', else the last number)",
                      choices=("rougeL", "accuracy"))


@dataclass
class OutputConfig:
    """Where a run writes."""

    dir: str = opt("runs/default", "the run directory (config.yaml, metrics.jsonl, checkpoints/, best/, final/)")
    merge: bool = opt(False, "with model.lora: final/ (and best/) also hold the merged model")
    overwrite: bool = opt(False, "replace a finished or interrupted run in dir (else refused unless train.resume)")
    push_to_hub: Optional[str] = opt(None, "a Hugging Face Hub repository id: final/ (with its model card) is uploaded "
                                     "there at the end (needs hub access and a token: hf auth login or HF_TOKEN)")
    hub_private: bool = opt(True, "with push_to_hub: create the repository private")
