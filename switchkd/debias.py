"""``switchkd debias``: the CRISPR workflow end to end on BBQ-format data.

Split into dev/test, sample attribution instances from dev, score neurons, search n on dev,
prune, and write the pruned model (``save_pretrained``) with ``debias_report.json``/``.md``
and ``neurons_by_layer.png``.  Works for decoder-only and encoder-decoder models.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from switchkd.bbq import INSTRUCTIONS, read_bbq, split
from switchkd.crispr import Pruner, accuracy, bias_scores, layer_of, rank_neurons, search_n
from switchkd.sections import ConfigError


@dataclass
class DebiasConfig:
    dev_fraction: float = 0.1
    instances: int = 20  # attribution instances sampled from dev
    instructions: int = 10  # how many of the built-in instructions to use
    candidates: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64])
    target: str = "p"  # p | logp
    gold_clamp: str = "instance"  # instance | batch
    seed: int = 0
    limit: Optional[int] = None  # use only the first N records (after shuffling)
    eval_limit: Optional[int] = None  # test items scored before/after (None: all)


def load_any(model_dir: str) -> tuple[Any, Any]:
    """A causal LM or an encoder-decoder model, with its tokenizer (pad token ensured)."""
    try:
        cfg = AutoConfig.from_pretrained(model_dir)
        cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
        model, tok = cls.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # missing, truncated or garbage files (OSError, ValueError, SafetensorError, ...)
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"model {model_dir!r}: cannot load ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def run_debias(model: Any, tok: Any, data: Sequence[str], output: str | Path, cfg: DebiasConfig) -> Dict[str, Any]:
    """CRISPR on ``model`` (pruned in place); writes the model and reports to ``output``."""
    if not 1 <= cfg.instructions <= len(INSTRUCTIONS):
        raise ConfigError(f"--instructions must be between 1 and {len(INSTRUCTIONS)}")
    items = read_bbq(data)
    random.Random(cfg.seed).shuffle(items)
    items = items[: cfg.limit] if cfg.limit else items
    dev, test = split(items, cfg.dev_fraction, cfg.seed)
    test = test[: cfg.eval_limit] if cfg.eval_limit else test
    instructions = list(INSTRUCTIONS[: cfg.instructions])
    attr_items = random.Random(cfg.seed + 1).sample(dev, min(cfg.instances, len(dev)))
    before = accuracy(model, tok, test, instructions)
    scores = bias_scores(model, tok, attr_items, instructions, cfg.target, cfg.gold_clamp)
    ranked = rank_neurons(scores)
    found = search_n(model, tok, ranked, dev, instructions, cfg.candidates)
    pruned = [(n, i) for n, i, _ in ranked[: found.n]]
    Pruner(model).prune(pruned)
    after = accuracy(model, tok, test, instructions)
    report = {"config": asdict(cfg), "data": list(map(str, data)), "n_dev": len(dev), "n_test": len(test),
              "n": found.n, "dev_accuracy_by_n": found.dev_accuracy,
              "neurons": [{"module": n, "layer": layer_of(n), "index": i, "score": s} for n, i, s in ranked[: found.n]],
              "top_candidates": [{"module": n, "index": i, "score": s} for n, i, s in ranked[:20]],
              "before": before, "after": after}
    write_outputs(model, tok, report, Path(output))
    return report


def check_output(out: Path, inputs: Sequence[Any] = ()) -> None:
    """Refuse an output path that exists with content, is an input or cannot be written (never delete what
    the user has there)."""
    from switchkd.rundir import check_output_path

    check_output_path(out, "--output", "dir", inputs)


def write_outputs(model: Any, tok: Any, report: Dict[str, Any], out: Path) -> None:
    """The pruned model plus the reports, written to a fresh temporary directory beside ``out`` and
    renamed to ``out`` (which must not exist, or be an empty directory); nothing is left on failure."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "debias_report.json").write_text(json.dumps(report, indent=1))
        (tmp / "debias_report.md").write_text(render_markdown(report))
        plot_layers(report, tmp / "neurons_by_layer.png")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_markdown(r: Dict[str, Any]) -> str:
    def cell(d: Dict[str, Any], k: str) -> str:
        return f"{100 * d[k]['mean']:.2f} ± {100 * d[k]['std']:.2f}" if k in d else "–"

    lines = [f"# CRISPR debiasing report\n\nData: {', '.join(r['data'])} (dev {r['n_dev']}, test {r['n_test']}). "
             f"Pruned n = {r['n']} neurons (chosen on dev from {sorted(r['dev_accuracy_by_n'])}).", "",
             "| test accuracy (%) | before | after |", "|---|---:|---:|"]
    for k, label in (("ambig", "ambiguous contexts"), ("disambig", "disambiguated contexts"), ("all", "all")):
        lines.append(f"| {label} | {cell(r['before'], k)} | {cell(r['after'], k)} |")
    lines += ["", "Mean ± standard deviation over instructions.", "", "| module | layer | index | bias score |",
              "|---|---|---:|---:|"]
    lines += [f"| {x['module']} | {x['layer']} | {x['index']} | {x['score']:.3g} |" for x in r["neurons"]]
    return "\n".join(lines) + "\n"


def plot_layers(report: Dict[str, Any], path: Path) -> None:
    """Where the pruned neurons sit, by layer (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    counts = Counter(x["layer"] for x in report["neurons"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = sorted(counts) or ["(none)"]
    ax.bar(names, [counts.get(n, 0) for n in names])
    ax.set_ylabel("pruned neurons")
    ax.set_title(f"CRISPR: {report['n']} neurons by layer")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def debias_cli(args: Any) -> Dict[str, Any]:
    cfg = DebiasConfig(dev_fraction=args.dev_fraction, instances=args.instances, instructions=args.instructions,
                       target=args.target, gold_clamp=args.gold_clamp, seed=args.seed, limit=args.limit,
                       eval_limit=args.eval_limit)
    if args.candidates:
        cfg.candidates = args.candidates
    if not 0.0 < cfg.dev_fraction < 1.0:
        raise ConfigError(f"--dev-fraction {cfg.dev_fraction}: expected a value in (0, 1)")
    if cfg.instances < 1 or (cfg.limit is not None and cfg.limit < 2) or (cfg.eval_limit is not None and cfg.eval_limit < 1):
        raise ConfigError("--instances and --eval-limit must be >= 1, --limit >= 2")
    if any(n < 0 for n in cfg.candidates):
        raise ConfigError(f"--candidates {cfg.candidates}: expected counts >= 0")
    check_output(Path(args.output), [args.model, *args.data])
    read_bbq(args.data)  # the data's mistakes before the model loads
    model, tok = load_any(args.model)
    if torch.cuda.is_available():
        model.cuda()
    return run_debias(model, tok, args.data, args.output, cfg)
