"""CRISPR (Yang et al., ACL 2024): find and eliminate bias neurons without retraining.

A neuron is one output unit of an ``nn.Linear`` (or GPT-2's ``Conv1D``) other than the LM
head.  Attribution A_i(ι, x, y) = h_i · ∂P(y | ι, x)/∂h_i (one forward, one backward), max
over token positions.  The biased answer ŷ is the most probable wrong option.  Bias score
B_i = Σ_j α_j [A_i(ŷ_j) − max(0, A_i(y_j))] with α_j = P(ŷ_j), averaged over the
instructions.  Options (the public code's choices): attribute log P instead of P
(``target="logp"``) and clamp the gold term once per batch (``gold_clamp="batch"``).
The top-n neurons are zeroed (weight rows and biases), reversibly; n is searched on dev.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from switchkd.bbq import Item, prompt


def neuron_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every Linear/Conv1D except the LM head (and anything sharing its weight), by name."""
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head and mod.weight is not head_w:
            out[name] = mod
    return out


def n_out(mod: nn.Module) -> int:
    return mod.weight.shape[1] if isinstance(mod, Conv1D) else mod.weight.shape[0]


def layer_of(name: str) -> str:
    """The block a module belongs to, e.g. ``transformer.h.3`` or ``encoder.block.1``."""
    m = re.match(r"(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def _encode(tok: Any, text: str) -> List[int]:
    ids = tok(text)["input_ids"]
    return ids[:-1] if ids and ids[-1] == tok.eos_token_id and tok.eos_token_id != tok.bos_token_id else ids


def _pair_batch(model: Any, tok: Any, pairs: Sequence[Tuple[str, str]]) -> Dict[str, Tensor]:
    """Inputs scoring ``answer`` after ``prompt``; ``target_mask`` marks the answer's tokens."""
    device = next(model.parameters()).device
    if model.config.is_encoder_decoder:
        enc = tok([p for p, _ in pairs], return_tensors="pt", padding=True)
        lab = tok([a for _, a in pairs], return_tensors="pt", padding=True)
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                "labels": labels.to(device)}
    seqs, starts = [], []
    for p, a in pairs:
        pi = _encode(tok, p)
        ai = tok(" " + a.strip(), add_special_tokens=False)["input_ids"]
        seqs.append(pi + ai)
        starts.append(len(pi))
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id or 0, dtype=torch.long)
    mask, target = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        target[i, st: len(s)] = torch.tensor(s[st:])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": target.to(device)}


def sequence_logprob(model: Any, batch: Dict[str, Tensor]) -> Tensor:
    """Σ log P(answer tokens | prompt) per row, teacher-forced; ``[B]`` (differentiable)."""
    if model.config.is_encoder_decoder:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        labels = batch["labels"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * (labels != -100)).sum(-1)


@torch.no_grad()
def option_logprobs(model: Any, tok: Any, items: Sequence[Item], instruction: str, batch_size: int = 32) -> Tensor:
    """log P(option | prompt) for every item and option; ``[N, 3]``."""
    pairs = [(prompt(instruction, it), opt) for it in items for opt in it.options]
    out = [sequence_logprob(model, _pair_batch(model, tok, pairs[i:i + batch_size]))
           for i in range(0, len(pairs), batch_size)]
    return torch.cat(out).view(len(items), 3).cpu()


def accuracy(model: Any, tok: Any, items: Sequence[Item], instructions: Sequence[str]) -> Dict[str, Any]:
    """Accuracy per instruction on ambiguous and disambiguated contexts (and overall)."""
    gold = torch.tensor([it.label for it in items])
    cond = [it.condition for it in items]
    per: Dict[str, List[float]] = {"all": [], "ambig": [], "disambig": []}
    for ins in instructions:
        correct = (option_logprobs(model, tok, items, ins).argmax(-1) == gold).float()
        per["all"].append(float(correct.mean()))
        for c in ("ambig", "disambig"):
            sel = torch.tensor([x == c for x in cond])
            if sel.any():
                per[c].append(float(correct[sel].mean()))
    return {k: {"mean": float(torch.tensor(v).mean()), "std": float(torch.tensor(v).std()) if len(v) > 1 else 0.0,
                "per_instruction": v} for k, v in per.items() if v}


@contextmanager
def capture(modules: Dict[str, nn.Module]) -> Iterator[Dict[str, Tensor]]:
    """Record each module's output (with ``retain_grad``) during the forward passes inside."""
    acts: Dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: Tensor) -> None:
            if out.requires_grad:
                out.retain_grad()
            elif torch.is_grad_enabled():  # frozen model: make the activation a leaf that gets a .grad
                out.requires_grad_(True)
            acts[name] = out
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def attribution(model: Any, tok: Any, modules: Dict[str, nn.Module], text: str, answer: str,
                target: str = "p", reduce: str = "max") -> Dict[str, Tensor]:
    """A_i = h_i · ∂P(answer | text)/∂h_i; max over token positions (``[n_out]``) or per position
    (``reduce="none"``: ``[T, n_out]``); ``{module: values}``."""
    batch = _pair_batch(model, tok, [(text, answer)])
    model.zero_grad(set_to_none=True)
    with capture(modules) as acts:
        lp = sequence_logprob(model, batch)[0]
        (lp if target == "logp" else lp.exp()).backward()
    vals = {n: (a * a.grad).detach()[0] for n, a in acts.items()}
    return vals if reduce == "none" else {n: v.amax(0) for n, v in vals.items()}


def bias_scores(model: Any, tok: Any, items: Sequence[Item], instructions: Sequence[str], target: str = "p",
                gold_clamp: str = "instance") -> Dict[str, Tensor]:
    """B_i per neuron, averaged over instructions; ``{module: [n_out]}``."""
    modules = neuron_modules(model)
    total = {n: torch.zeros(n_out(m)) for n, m in modules.items()}
    was_training = model.training
    model.eval()
    for ins in tqdm(instructions, desc="attribution"):
        lp = option_logprobs(model, tok, items, ins)
        biased_sum = {n: torch.zeros_like(v) for n, v in total.items()}
        gold_sum = {n: torch.zeros_like(v) for n, v in total.items()}
        for j, it in enumerate(items):
            wrong = [k for k in range(3) if k != it.label]
            y_hat = max(wrong, key=lambda k: float(lp[j, k]))
            alpha = float(lp[j, y_hat].exp())
            text = prompt(ins, it)
            a_hat = attribution(model, tok, modules, text, it.options[y_hat], target)
            a_gold = attribution(model, tok, modules, text, it.options[it.label], target)
            for n in total:
                biased_sum[n] += alpha * a_hat[n].float().cpu()
                g = a_gold[n].float().cpu()
                gold_sum[n] += alpha * g.clamp(min=0) if gold_clamp == "instance" else g
        for n in total:
            gold = gold_sum[n] if gold_clamp == "instance" else gold_sum[n].clamp(min=0)
            total[n] += (biased_sum[n] - gold) / len(instructions)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return total


def rank_neurons(scores: Dict[str, Tensor]) -> List[Tuple[str, int, float]]:
    """All neurons as ``(module, index, score)``, highest bias score first."""
    flat = [(n, i, float(v)) for n, s in scores.items() for i, v in enumerate(s.tolist())]
    return sorted(flat, key=lambda x: -x[2])


class Pruner:
    """Zero chosen neurons (weight rows and biases) and restore them exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = neuron_modules(model)
        self.saved: List[Tuple[nn.Module, int, Tensor, Optional[Tensor]]] = []

    @torch.no_grad()
    def prune(self, neurons: Sequence[Tuple[str, int]]) -> None:
        for name, idx in neurons:
            m = self.modules[name]
            conv = isinstance(m, Conv1D)
            row = m.weight[:, idx] if conv else m.weight[idx]
            self.saved.append((m, idx, row.clone(), m.bias[idx].clone() if m.bias is not None else None))
            row.zero_()
            if m.bias is not None:
                m.bias[idx] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for m, idx, row, bias in reversed(self.saved):
            (m.weight[:, idx] if isinstance(m, Conv1D) else m.weight[idx]).copy_(row)
            if bias is not None:
                m.bias[idx] = bias
        self.saved.clear()


@dataclass
class SearchResult:
    n: int
    dev_accuracy: Dict[int, float]


def search_n(model: Any, tok: Any, ranked: Sequence[Tuple[str, int, float]], dev: Sequence[Item],
             instructions: Sequence[str], candidates: Sequence[int]) -> SearchResult:
    """The n (among ``candidates``) maximising mean dev accuracy over instructions."""
    pruner, acc = Pruner(model), {}
    usable = sorted(set(c for c in candidates if c <= len(ranked)))
    if not usable:
        from switchkd.sections import ConfigError

        raise ConfigError(f"--candidates {sorted(candidates)}: every value exceeds the {len(ranked)} neurons scored")
    for n in tqdm(usable, desc="search n"):
        pruner.prune([(name, i) for name, i, _ in ranked[:n]])
        acc[n] = accuracy(model, tok, dev, instructions)["all"]["mean"]
        pruner.restore()
    best = max(acc, key=lambda k: (acc[k], -k))
    return SearchResult(best, acc)
