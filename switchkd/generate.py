"""``switchkd generate``: a JSONL dataset of teacher responses (SeqKD's data).

The output is in the MiniLLM format (``instruction``, ``input``, ``prompt``, ``output``),
so ``switchkd train configs/tiny/sft.yaml data.train=OUT.jsonl`` is SeqKD done offline.
The teacher sees its primed prompt when ``method.priming`` is set; ``prompt`` stays the student's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List

import torch
from tqdm.auto import tqdm

from switchkd.data import Example, Tokenized, build_batch, load_examples, tokenize
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import from_method, rollout
from switchkd.rules import TeacherWrites
from switchkd.sections import ConfigError

if TYPE_CHECKING:
    from switchkd.config import Config


def teacher_and_data(cfg: Config, command: str) -> tuple[Any, Any, str, List[Example], List[Tokenized]]:
    """The frozen teacher (on the GPU when there is one; a :class:`switchkd.served.ServedTeacher` with
    ``teacher.server``), its tokenizer, the device, and ``data.train``
    loaded and tokenized exactly as training does (priming included)."""
    if cfg.teacher is None:
        raise ConfigError(f"config error: switchkd {command} needs teacher.name")
    tok = load_tokenizer(cfg.teacher)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.teacher.server:  # the teacher's own vLLM server samples (switchkd.served)
        from switchkd.served import connect

        teacher = connect(cfg)
    else:
        teacher = load_model(cfg.teacher, tok, trainable=False).to(device)
    examples = load_examples(cfg.data.train, cfg.data, tok, cfg.data.limit)
    items, stats = tokenize(examples, tok, cfg.data.max_prompt_length, cfg.data.max_length, cfg.method.priming)
    print(stats.line(command))
    return teacher, tok, device, examples, items


def generate_dataset(cfg: Config, output: str | Path, batch_size: int = 16) -> int:
    """Write the teacher's response to every ``data.train`` prompt; returns the number written."""
    teacher, tok, device, examples, items = teacher_and_data(cfg, "generate")
    torch.manual_seed(cfg.train.seed)
    out, tmp = Path(output), Path(str(output) + ".tmp")
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a directory; expected a .jsonl file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write(tmp, teacher, tok, device, examples, items, cfg, batch_size)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    tmp.replace(out)
    return len(items)


def _write(tmp: Path, teacher: Any, tok: Any, device: str, examples: List[Example], items: List[Tokenized],
           cfg: Config, batch_size: int) -> None:
    m = cfg.method
    with open(tmp, "w", encoding="utf-8") as f:
        for i in tqdm(range(0, len(items), batch_size), desc="generate"):
            chunk = items[i:i + batch_size]
            prompts = [x.teacher_prompt or x.prompt for x in chunk]
            b = build_batch(prompts, [[] for _ in chunk], tok.pad_token_id, [x.index for x in chunk])
            P = b.prompt_ids.shape[1]
            budget = max(1, min(m.max_new_tokens, cfg.data.max_length - P))
            if getattr(teacher, "served", False):  # the server samples with the preset's decoding settings
                responses = teacher.sample(prompts, budget, m.decoding, tok.eos_token_id, seed=cfg.train.seed * 1000 + i)
            else:
                rcfg = from_method(m, budget, tok, len(tok))
                r = rollout(None, teacher, b.prompt_ids.to(device), b.prompt_mask.to(device), rcfg, TeacherWrites())
                responses = [r.sequences[j, P:][r.response_mask[j]].tolist() for j in range(len(chunk))]
            for j, x in enumerate(chunk):
                ex = examples[x.index]
                text = tok.decode(responses[j], skip_special_tokens=True).strip()
                f.write(json.dumps({"instruction": ex.instruction, "input": "", "prompt": ex.prompt, "output": text}) + "\n")
