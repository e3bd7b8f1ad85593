"""A run's output directory: refusing to overwrite a finished run, trimming the metrics log on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from switchkd.config import Config, ConfigError

RUN_FILES = ("metrics.jsonl", "config.yaml", "final", "best", "checkpoints")


def check_output_dir(cfg: Config) -> None:
    """Refuse an ``output.dir`` that already holds a run unless resuming it or ``output.overwrite``;
    with ``output.overwrite`` remove only the run's own files (never anything else in the directory)."""
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir={out}: exists and is not a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or cfg.train.resume:
        return
    if not cfg.output.overwrite:
        raise ConfigError(f"output.dir={out}: already holds a run ({', '.join(found)}); set train.resume=true to "
                          "continue it or output.overwrite=true to replace it")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the lines of ``out/metrics.jsonl`` up to optimizer step ``step`` (a resumed run logs the rest again)."""
    path = out / "metrics.jsonl"
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line + "\n")
            except ValueError:
                continue  # a line cut by the kill
        path.write_text("".join(keep), encoding="utf-8")
