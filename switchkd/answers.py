"""``switchkd answers``: read what models answer, side by side, before comparing their scores.

Every model answers the same records through its own prompt template (its chat template when its tokenizer has
one, as ``switchkd eval`` and training with ``data.template: auto`` do); the instruction, its context, the
reference and each model's answer are printed per record and, with ``--output``, written as JSON Lines
(``{"instruction", "context", "reference", "answers": {model: text}}``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO

from switchkd.records import Example
from switchkd.sections import ConfigError, DataConfig, EvalConfig, ModelConfig


def labels(models: Sequence[str]) -> List[str]:
    """A short distinct label per model: its directory's name, with its parent where names repeat
    (``runs/kd/final`` and ``runs/switch/final`` -> ``kd/final``, ``switch/final``)."""
    names = [Path(m).name or m for m in models]
    if len(set(names)) == len(names):
        return names
    return ["/".join(Path(m).parts[-2:]) for m in models]


def answer_all(models: Sequence[str], data: str, limit: int, ecfg: EvalConfig, data_cfg: DataConfig,
               dtype: str = "float32", seed: Optional[int] = None) -> tuple[List[Example], Dict[str, List[str]]]:
    """The first ``limit`` records of ``data`` and each model's answers to them (``{label: [answer per record]}``);
    every model's records are read (and their mistakes reported) before any model loads."""
    import torch

    from switchkd.data import load_examples
    from switchkd.evaluate import generate_texts
    from switchkd.models import load_model, load_tokenizer

    if len(set(models)) != len(models):
        raise ConfigError(f"--model: {', '.join(models)}: a model is given twice")
    tokenizers = [load_tokenizer(ModelConfig(name=m, dtype=dtype)) for m in models]
    per_model = [load_examples(data, data_cfg, tok, limit) for tok in tokenizers]
    if not per_model[0]:
        raise ConfigError(f"{data}: no records")
    answers: Dict[str, List[str]] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, label, tok, examples in zip(models, labels(models), tokenizers, per_model):
        model = load_model(ModelConfig(name=name, dtype=dtype), tok, trainable=False).to(device)
        answers[label] = generate_texts(model, tok, [e.prompt for e in examples], ecfg, seed, desc=label)
        del model
    return per_model[0], answers


def show(examples: Sequence[Example], answers: Dict[str, List[str]], out: TextIO = sys.stdout) -> None:
    """Print each record: instruction, context, reference, then every model's answer."""
    for i, e in enumerate(examples):
        print(f"=== {i + 1}. {e.instruction.strip()}", file=out)
        if e.context.strip():
            print(f"--- context\n{e.context.strip()}", file=out)
        print(f"--- reference\n{e.references[0].strip() if e.references else ''}", file=out)
        for label, texts in answers.items():
            print(f"--- {label}\n{texts[i]}", file=out)
        print(file=out)


def write_jsonl(path: Path, examples: Sequence[Example], answers: Dict[str, List[str]]) -> None:
    """One JSON object per record (written to a temporary file, renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            row = {"instruction": e.instruction, "context": e.context, "reference": e.references[0] if e.references else "",
                   "answers": {label: texts[i] for label, texts in answers.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def decoding(greedy: bool, max_new_tokens: int, max_prompt_length: int, batch_size: int) -> EvalConfig:
    """The answers' generation settings (greedy unless sampling is asked for)."""
    return replace(EvalConfig(), do_sample=not greedy, max_new_tokens=max_new_tokens,
                   max_prompt_length=max_prompt_length, max_length=max_prompt_length + max_new_tokens,
                   batch_size=batch_size)
