"""``switchkd cache-teacher``: the teacher's top-k log-probabilities on a fixed dataset, on disk.

For every response token of ``data.train`` (tokenized exactly as training tokenizes it, priming
included) the cache holds the teacher's k largest log-probabilities and their ids
(safetensors: ``logp [N, k]`` float32, ``ids [N, k]`` int32, ``offsets [n + 1]``, ``index [n]``),
so multi-epoch KD, top-k KL and BiLD runs need no teacher in memory (``method.teacher_cache=DIR``).

Approximation: the loss sees the teacher distribution rebuilt as the cached top-k log-probabilities
plus the remaining mass spread evenly over the other V - k tokens.  ``topk_kl`` with the same k and
BiLD's teacher-led term are exact; other divergences differ by the tail's shape
(``tests/test_teacher_cache.py`` measures it; docs/benchmarks.md records it).  The targets stay
sparse (:class:`switchkd.divergences.TopK`): fkl and topk_kl are computed from the k entries at
about the cost of cross-entropy; other divergences rebuild the ``[N, V]`` distribution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from switchkd.config import Config, ConfigError
from switchkd.data import collate
from switchkd.divergences import TopK
from switchkd.sources import teacher_targets


@torch.no_grad()
def build_cache(cfg: Config, output: str | Path, k: int = 64, batch_size: int = 16) -> Path:
    """Run the teacher once over ``data.train`` and write the top-k cache to ``output``."""
    from switchkd.generate import teacher_and_data

    teacher, tok, device, _, items = teacher_and_data(cfg, "cache-teacher")
    vocab = len(tok)
    logp, ids, lengths, index = [], [], [], []
    for i in tqdm(range(0, len(items), batch_size), desc="cache teacher"):
        chunk = items[i:i + batch_size]
        b = {key: v.to(device) for key, v in collate(chunk, tok.pad_token_id).items()}
        sel = torch.log_softmax(teacher_targets(teacher, b, vocab).float(), -1)  # the loss's teacher path
        top = sel.topk(min(k, vocab), dim=-1)
        logp.append(top.values.cpu())
        ids.append(top.indices.int().cpu())
        lengths += [len(x.response) for x in chunk]
        index += [x.index for x in chunk]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    save_file({"logp": torch.cat(logp), "ids": torch.cat(ids), "offsets": offsets, "index": torch.tensor(index)},
              str(out / "teacher_topk.safetensors"))
    (out / "meta.json").write_text(json.dumps({"k": k, "vocab": vocab, "teacher": cfg.teacher.name,
                                               "data": cfg.data.train, "priming": cfg.method.priming,
                                               "examples": len(items), "tokens": int(offsets[-1])}))
    return out


class TeacherCache:
    """Reads a cache and returns, for a batch, the teacher's top-k distributions (:class:`TopK`)."""

    def __init__(self, path: str | Path, vocab: int) -> None:
        path = Path(path)
        if not (path / "teacher_topk.safetensors").is_file():
            raise ConfigError(f"{path}: no teacher cache here (run switchkd cache-teacher first)")
        self.meta: Dict[str, Any] = json.loads((path / "meta.json").read_text())
        if self.meta["vocab"] != vocab:
            raise ConfigError(f"{path}: cache was built for vocabulary {self.meta['vocab']}, the student has {vocab}")
        t = load_file(str(path / "teacher_topk.safetensors"))
        self.logp, self.ids, self.offsets = t["logp"], t["ids"].long(), t["offsets"]
        self.row = {int(x): i for i, x in enumerate(t["index"])}
        self.vocab = vocab

    def targets(self, index: List[int], lengths: List[int]) -> TopK:
        """The cached teacher distributions at the response tokens of ``index`` (row-major), ``N`` rows.

        Kept sparse: fkl and topk_kl are evaluated from the k entries (exactly as on the rebuilt
        ``[N, V]`` distribution), other divergences rebuild it (:meth:`TopK.dense`).
        """
        parts_lp, parts_id = [], []
        for ex, n in zip(index, lengths):
            if ex not in self.row:
                raise ConfigError(f"example {ex} is not in the teacher cache (built for {self.meta['data']})")
            r = self.row[ex]
            lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
            if hi - lo != n:
                raise ConfigError(f"teacher cache holds {hi - lo} tokens for example {ex}, the batch has {n}: "
                                  "the cache was built with other data or length settings")
            parts_lp.append(self.logp[lo:hi])
            parts_id.append(self.ids[lo:hi])
        return TopK(torch.cat(parts_lp), torch.cat(parts_id), self.vocab)


def rebuild(top_logp: Tensor, top_ids: Tensor, vocab: int) -> Tensor:
    """Full log-probabilities ``[N, V]`` from top-k ``[N, k]``: the rest of the mass spread evenly."""
    return TopK(top_logp, top_ids, vocab).dense()
