"""Tables and PNG plots for the demo and the quality benchmark (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from switchkd.evaluate import ci95


def bucket_order(buckets: Sequence[str]) -> List[str]:
    return sorted(buckets, key=lambda b: int(b.lstrip(">").split("-")[0]) + (b.startswith(">")))


def method_table(results: Dict[str, List[dict]]) -> str:
    """Markdown: mean ± 95% CI over runs (seeds), overall and by reference-length bucket.

    ``results[method]`` is a list of ``score_examples`` dicts (one per seed).
    """
    buckets = bucket_order({b for runs in results.values() for r in runs for b in r["by_length"]})
    head = "| method | runs | ROUGE-L | " + " | ".join(f"len {b}" for b in buckets) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(buckets)]
    for name, runs in results.items():
        overall = [r["rougeL"] for r in runs]
        cells = []
        for b in buckets:
            vals = [r["by_length"][b]["rougeL"] for r in runs if b in r["by_length"]]
            cells.append(f"{statistics.fmean(vals):.1f}" if vals else "–")
        ci = f" ± {ci95(overall):.2f}" if len(overall) > 1 else f" ± {runs[0].get('rougeL_std', 0.0):.2f} (sd)"
        lines.append(f"| {name} | {len(runs)} | {statistics.fmean(overall):.2f}{ci} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_share_profile(metrics_file: Path) -> Dict[str, Dict[str, float]]:
    """Mean teacher-token share and gate value per position bucket over a run's logged steps (the
    ``<source>/teacher_frac@<bucket>`` and ``<source>/gate@<bucket>`` diagnostics of interleaved sources)."""
    sums: Dict[str, Dict[str, List[float]]] = {"teacher_frac": {}, "gate": {}}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        for key, val in rec.items():
            for kind in sums:
                name, sep, bucket = key.partition(f"/{kind}@")
                if sep and "/" not in name:
                    sums[kind].setdefault(bucket, []).append(val)
    return {kind: {b: statistics.fmean(v) for b, v in d.items()} for kind, d in sums.items()}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_by_length(results: Dict[str, List[dict]], path: Path, highlight: Optional[str] = None) -> Optional[Path]:
    """ROUGE-L by reference-length bucket, one line per method (``highlight``'s drawn bold)."""
    plt = _plt()
    if plt is None:
        return None
    buckets = bucket_order({b for runs in results.values() for r in runs for b in r["by_length"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in results.items():
        ys = [statistics.fmean([r["by_length"][b]["rougeL"] for r in runs if b in r["by_length"]] or [math.nan])
              for b in buckets]
        ax.plot(buckets, ys, marker="o", label=name, linewidth=2.5 if name == highlight else 1.2)
    ax.set_xlabel("reference length (words)")
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L by response length")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_teacher_share(profile: Dict[str, Dict[str, float]], path: Path) -> Optional[Path]:
    """A two-writer run's teacher-token rate and mean gate value by response position."""
    plt = _plt()
    if plt is None or not profile["teacher_frac"]:
        return None
    buckets = sorted(profile["teacher_frac"], key=lambda b: int(b.split("-")[0].rstrip("+")))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(buckets, [profile["teacher_frac"][b] for b in buckets], color="tab:orange", alpha=0.7)
    ax.set_ylabel("teacher-written share")
    ax.set_xlabel("response position")
    ax2 = ax.twinx()
    ax2.plot(buckets, [profile["gate"].get(b, math.nan) for b in buckets], color="tab:blue", marker="o")
    ax2.set_ylabel("mean gate value")
    ax.set_title("who writes, by position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
