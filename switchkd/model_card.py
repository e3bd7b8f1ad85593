"""A model card (``README.md``, the format the Hugging Face Hub reads: YAML metadata, then Markdown) written into
every model a run saves (``best/``, ``final/``): teacher, method, data, key settings and the dev figures so far;
and the optional upload of ``final/`` to the hub (``output.push_to_hub``)."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from switchkd.sections import ConfigError


def hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` when it reads as a hub id (``owner/model``, not a local path), else None."""
    if not name or name.startswith(("/", ".", "~", "tiny:")) or name.count("/") != 1 or Path(name).exists():
        return None
    return name


def dev_figures(metrics: Path, step: int) -> List[Dict[str, Any]]:
    """The dev evaluations logged in ``metrics`` (``metrics.jsonl``) up to ``step``."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "dev_loss" in r and r.get("step", 0) <= step]


def card_text(cfg: Any, section: Optional[Any], step: int, metrics: Path) -> str:
    """The card's text for a model saved at optimizer step ``step`` of the run ``cfg`` (``section``: the method's
    own config section, e.g. SWITCH's tau0 and decay)."""
    from huggingface_hub import ModelCardData

    teacher = cfg.teacher.name if cfg.teacher is not None else None
    method = cfg.method
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=hub_id(cfg.model.name),
                         tags=["switchkd", "knowledge-distillation", method.name],
                         datasets=[d for d in [hub_id(cfg.data.train)] if d])
    settings = {"method": f"{method.name} (sequences: {method.source}, per-token loss: {method.divergence})",
                "teacher": teacher or "none", "teacher server": getattr(cfg.teacher, "server", None),
                "student initialised from": cfg.model.name, "training data": cfg.data.train,
                "dev data": cfg.data.dev, "prompt template": cfg.data.template,
                "optimizer steps": step, "learning rate": f"{cfg.train.lr} ({cfg.train.scheduler}, "
                f"{cfg.train.warmup_steps} warm-up steps)", "batch": f"{cfg.train.batch_size} x grad_accum "
                f"{cfg.train.grad_accum}", "max length": cfg.data.max_length, "seed": cfg.train.seed,
                "LoRA": f"rank {cfg.model.lora.r}" if cfg.model.lora.r else None}
    if method.divergence and method.params:
        settings["divergence parameters"] = ", ".join(f"{k}={v}" for k, v in method.params.items())
    if section is not None and is_dataclass(section):
        settings["method settings"] = ", ".join(f"{k}={v}" for k, v in asdict(section).items() if not isinstance(v, dict))
    lines = [f"# {Path(cfg.output.dir).name}", "",
             f"Distilled with switchkd from {teacher or 'no teacher'} by {method.name}.", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items() if v not in (None, "")]
    figures = dev_figures(Path(metrics), step)
    if figures:
        keys = [k for k in ("dev_loss", "dev_ce", "dev_rougeL") if any(k in r for r in figures)]
        lines += ["", "## Dev figures", "", "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |" for r in figures]
    return f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n"


def write_card(directory: Path, cfg: Any, section: Optional[Any], step: int, metrics: Path) -> None:
    """Write ``directory/README.md`` (a peft adapter's own card is replaced)."""
    (Path(directory) / "README.md").write_text(card_text(cfg, section, step, metrics), encoding="utf-8")


def push(folder: Path, repo: str, private: bool) -> str:
    """Upload ``folder`` to the hub repository ``repo`` (created when missing); returns its URL.  Needs hub access
    and a token (``hf auth login`` or ``HF_TOKEN``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="switchkd: upload the distilled student")
    except Exception as exc:  # offline, no token, no rights: one line, the local model stays
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"output.push_to_hub={repo}: the upload failed ({first}); the model is in {folder}; log in "
                          "(hf auth login or HF_TOKEN) and upload it with: hf upload " f"{repo} {folder}") from None
    return str(url)
