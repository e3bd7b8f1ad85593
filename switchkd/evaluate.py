"""Generation and ROUGE-L scoring by the MiniLLM/DistiLLM protocol.

Defaults: sampling at temperature 1, top-p 1, top-k 0, prompt <= 256 tokens (longer
prompts keep their last 256 tokens), at most 512 tokens in all, seeds 10..50;
ROUGE-L is Google's ``rouge-score`` (``rougeL``, Porter stemming) F-measure,
max over references, x100; mean and std over seeds, and by reference length.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from switchkd.data import Example, encode_prompt, left_pad, load_examples
from switchkd.metrics import METRICS, rouge_l  # noqa: F401  (rouge_l: re-exported)
from switchkd.rollout import RolloutConfig, head_rows, rollout
from switchkd.rules import StudentWrites
from switchkd.sections import ConfigError, DataConfig, EvalConfig, decoding_of

SUITE = {  # name -> candidate paths inside a MiniLLM-style data directory
    "dolly": ("dolly/valid.jsonl",),
    "self-inst": ("self-inst/valid.jsonl",),
    "vicuna": ("vicuna/valid.jsonl",),
    "sinst": ("sinst_11_/valid.jsonl", "sinst/11_/valid.jsonl"),
    "uinst": ("uinst/11_/valid.jsonl", "uinst/valid.jsonl"),
}


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvalConfig, seed: Optional[int],
                   desc: str = "generate") -> List[str]:
    """Batched generation through the rollout engine (KV caches; static and compiled on CUDA);
    returns the decoded responses (prompt removed).  ``seed`` seeds the global torch RNG."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    vocab = min(len(tokenizer), head_rows(model))
    out: List[str] = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False, disable=not prompts):
        chunk = [encode_prompt(tokenizer, p)[-cfg.max_prompt_length:] for p in prompts[start:start + cfg.batch_size]]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        budget = cfg.max_length - ids.shape[1]
        rcfg = RolloutConfig(max_new_tokens=max(1, min(cfg.max_new_tokens or budget, budget)),
                             **decoding_of(cfg), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab)
        r = rollout(model, None, ids.to(device), mask.to(device), rcfg, StudentWrites())
        P = ids.shape[1]
        out += [tokenizer.decode(r.sequences[i, P:][r.response_mask[i]], skip_special_tokens=True).strip()
                for i in range(len(chunk))]
    return out


def bucket_name(n_words: int, edges: Sequence[int]) -> str:
    """Label of the reference-length bucket (in words) that ``n_words`` falls in."""
    lo = 0
    for hi in edges:
        if n_words <= hi:
            return f"{lo}-{hi}"
        lo = hi + 1
    return f">{edges[-1]}"


def score_examples(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig,
                   name: str = "data") -> tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Generate for every seed and score; returns ``(scores, prediction records)``."""
    seeds: List[Optional[int]] = list(cfg.seeds) if cfg.do_sample else [None]
    metric, score_fn = cfg.metric, METRICS[cfg.metric]
    per_seed, records = [], []
    bucket_scores: Dict[str, List[float]] = {}
    n_long = sum(len(encode_prompt(tokenizer, e.prompt)) > cfg.max_prompt_length for e in examples)
    for seed in seeds:
        texts = generate_texts(model, tokenizer, [e.prompt for e in examples], cfg, seed, desc=f"{name} seed {seed}")
        scores = [score_fn(t, e.references) for t, e in zip(texts, examples)]
        per_seed.append(statistics.fmean(scores))
        for i, (t, e, s) in enumerate(zip(texts, examples, scores)):
            b = bucket_name(len(e.references[0].split()), cfg.buckets)
            bucket_scores.setdefault(b, []).append(s)
            records.append({"dataset": name, "index": i, "seed": seed, "prompt": e.prompt, "prediction": t,
                            "references": e.references, metric: s, "bucket": b, **e.meta})
    order = sorted(bucket_scores, key=lambda b: int(b.split("-")[0].lstrip(">")) + (b.startswith(">")))
    return {
        "dataset": name, "n": len(examples), "seeds": seeds, "metric": metric, f"{metric}_per_seed": per_seed,
        metric: statistics.fmean(per_seed), f"{metric}_std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
        "by_length": {b: {"n": len(bucket_scores[b]) // len(seeds), metric: statistics.fmean(bucket_scores[b])} for b in order},
        "prompts_truncated": n_long,
    }, records


@torch.no_grad()
def draft_report(draft: Any, target: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig,
                 k: int = 4) -> Dict[str, Any]:
    """``draft``'s worth as a greedy speculative-decoding draft for ``target`` on these prompts
    (:func:`switchkd.speculative.draft_stats`, summed over batches of ``cfg.batch_size``)."""
    from switchkd.speculative import draft_stats

    device = next(target.parameters()).device
    vocab = min(len(tokenizer), head_rows(draft), head_rows(target))
    tokens = checks = by_draft = 0
    for start in range(0, len(examples), cfg.batch_size):
        chunk = [encode_prompt(tokenizer, e.prompt)[-cfg.max_prompt_length:] for e in examples[start:start + cfg.batch_size]]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        budget = max(1, min(cfg.max_new_tokens or cfg.max_length, cfg.max_length - ids.shape[1]))
        r = draft_stats(draft, target, ids.to(device), mask.to(device), k, budget, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, vocab)
        tokens, checks = tokens + r["tokens"], checks + r["verifications"]
        by_draft += round(r["acceptance"] * r["tokens"])
    return {"k": k, "n": len(examples), "tokens": tokens, "verifications": checks,
            "tokens_per_verification": tokens / max(1, checks), "accepted_per_verification": by_draft / max(1, checks),
            "acceptance": by_draft / max(1, tokens)}


def resolve_suite(data: str) -> Dict[str, str]:
    """``{name: file}`` for a file (one set) or a MiniLLM-style directory (the five sets)."""
    path = Path(data)
    if data.split(":")[0] in ("synthetic", "arith"):  # the built-in suites
        return {data: data}
    if path.is_dir():
        found = {}
        for name, candidates in SUITE.items():
            hit = next((path / c for c in candidates if (path / c).is_file()), None)
            if hit is not None:
                found[name] = str(hit)
        if not found:
            raise ConfigError(f"{data}: directory holds none of the suite files ({', '.join(c[0] for c in SUITE.values())})")
        return found
    if not path.is_file():
        raise ConfigError(f"{data}: no such file or directory")
    return {path.parent.name if path.name == "valid.jsonl" else path.stem: data}


def read_sets(data: str, tokenizer: Any, cfg: EvalConfig, data_cfg: Optional[DataConfig] = None
              ) -> Dict[str, List[Example]]:
    """``{set name: examples}`` of a file or suite (read, and its mistakes reported, before a model loads)."""
    data_cfg = data_cfg or DataConfig()
    return {name: load_examples(src, data_cfg, tokenizer, cfg.limit) for name, src in resolve_suite(data).items()}


def evaluate(model: Any, tokenizer: Any, data: "str | Dict[str, List[Example]]", cfg: EvalConfig,
             data_cfg: Optional[DataConfig] = None, output: Optional[str | Path] = None, draft_for: Any = None,
             draft_k: int = 4) -> Dict[str, Any]:
    """Score a file or suite (or the sets :func:`read_sets` read); writes ``scores.json`` and
    ``predictions.jsonl`` to ``output`` atomically.  With ``draft_for`` (a target model sharing the
    tokenizer), also ``model``'s speculative-decoding draft statistics for it on the same prompts
    (``summary["draft"][set]``)."""
    sets = read_sets(data, tokenizer, cfg, data_cfg) if isinstance(data, str) else data
    results, records, drafts = {}, [], {}
    for name, examples in sets.items():
        results[name], recs = score_examples(model, tokenizer, examples, cfg, name)
        records += recs
        if draft_for is not None:
            drafts[name] = draft_report(model, draft_for, tokenizer, examples, cfg, draft_k)
    summary = {"config": asdict(cfg), "results": results} | ({"draft": drafts} if drafts else {})
    if output is not None:
        write_outputs(Path(output), summary, records)
    return summary


#: the files ``eval`` writes into its output directory (an earlier evaluation's are replaced)
OUTPUTS = ("scores.json", "predictions.jsonl")


def write_outputs(out: Path, summary: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    """Write scores.json and predictions.jsonl (each via a temporary file and rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in zip(OUTPUTS, (json.dumps(summary, indent=2), "".join(json.dumps(r) + "\n" for r in records))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def format_table(summary: Dict[str, Any]) -> str:
    """A Markdown table: one row per dataset with mean +- std over seeds."""
    metric = next(iter(summary["results"].values()), {}).get("metric", "rougeL")
    lines = [f"| dataset | n | {'ROUGE-L' if metric == 'rougeL' else metric} | std |", "|---|---:|---:|---:|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['n']} | {r[metric]:.2f} | {r[f'{metric}_std']:.2f} |")
    return "\n".join(lines)


def ci95(values: Sequence[float]) -> float:
    """Half-width of a normal-approximation 95% confidence interval of the mean."""
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
