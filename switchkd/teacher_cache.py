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
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from switchkd.data import collate
from switchkd.divergences import TopK
from switchkd.losses import teacher_targets
from switchkd.rundir import write_new_dir
from switchkd.sections import ConfigError

if TYPE_CHECKING:
    from switchkd.config import Config


@torch.no_grad()
def build_cache(cfg: Config, output: str | Path, k: int = 64, batch_size: int = 16) -> Path:
    """Run the teacher once over ``data.train`` and write the top-k cache to ``output``."""
    from switchkd.generate import teacher_and_data

    if cfg.teacher is not None and cfg.teacher.server:
        raise ConfigError(f"teacher.server={cfg.teacher.server}: switchkd cache-teacher runs the teacher in the process; "
                          "unset teacher.server (or train with the server directly)")
    teacher, tok, device, _, items = teacher_and_data(cfg, "cache-teacher")
    vocab = len(tok)
    logp, ids, lengths, index = [], [], [], []
    for i in tqdm(range(0, len(items), batch_size), desc="cache teacher"):
        chunk = items[i:i + batch_size]
        b = collate(chunk, tok.pad_token_id).to(device)
        sel = torch.log_softmax(teacher_targets(teacher, b, vocab).float(), -1)  # the loss's teacher path
        top = sel.topk(min(k, vocab), dim=-1)
        logp.append(top.values.cpu())
        ids.append(top.indices.int().cpu())
        lengths += [len(x.response) for x in chunk]
        index += [x.index for x in chunk]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    meta = {"k": k, "vocab": vocab, "teacher": cfg.teacher.name, "data": cfg.data.train, "priming": cfg.method.priming,
            "examples": len(items), "tokens": int(offsets[-1])}

    def write(tmp: Path) -> None:
        save_file({"logp": torch.cat(logp), "ids": torch.cat(ids), "offsets": offsets, "index": torch.tensor(index)},
                  str(tmp / "teacher_topk.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))

    out = write_new_dir(Path(output), write)  # renamed into place when complete
    return out


KEYS = {"logp": 2, "ids": 2, "offsets": 1, "index": 1}  # tensor -> its number of dimensions
META = ("k", "vocab", "data", "priming", "examples", "tokens")


def read_meta(path: str | Path, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """``meta.json`` of the cache at ``path``, checked (and, with ``cfg``, matched to the run's data and
    priming) before any model loads; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"method.teacher_cache={path}: not a directory (run switchkd cache-teacher first)")
    if not (path / "teacher_topk.safetensors").is_file():
        raise ConfigError(f"method.teacher_cache={path}: no teacher_topk.safetensors here (run switchkd "
                          "cache-teacher first)")
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path / 'meta.json'}: missing; the cache is incomplete (build it again with switchkd "
                          "cache-teacher)") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path / 'meta.json'}: unreadable ({str(exc).splitlines()[0]}); build the cache "
                          "again") from None
    if not isinstance(meta, dict) or any(k not in meta for k in META):
        raise ConfigError(f"{path / 'meta.json'}: expected an object with {', '.join(META)}; build the cache again")
    if cfg is not None:
        for key, want in (("data", cfg.data.train), ("priming", cfg.method.priming)):
            if meta[key] != want and not (key == "data" and _same_file(meta[key], want)):
                raise ConfigError(f"method.teacher_cache={path}: built for {key} {meta[key]!r}, this run has "
                                  f"{want!r}; build a cache for this data with switchkd cache-teacher")
    return meta


def _same_file(a: Any, b: Any) -> bool:
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except (TypeError, OSError):
        return False


class TeacherCache:
    """Reads a cache and returns, for a batch, the teacher's top-k distributions (:class:`TopK`)."""

    def __init__(self, path: str | Path, vocab: Optional[int] = None) -> None:
        path = Path(path)
        self.path = path
        self.meta: Dict[str, Any] = read_meta(path)
        if vocab is not None:
            self.check_vocab(vocab)
        file = path / "teacher_topk.safetensors"
        try:
            t = load_file(str(file))
        except Exception as exc:  # truncated or garbage: safetensors' own error types
            raise ConfigError(f"{file}: unreadable ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                              "build the cache again") from None
        bad = [k for k, dims in KEYS.items() if k not in t or t[k].dim() != dims]
        n = t["index"].numel() if "index" in t else -1
        if bad or t["offsets"].numel() != n + 1 or t["logp"].shape != t["ids"].shape or \
                int(t["offsets"][-1]) != t["logp"].shape[0]:
            what = f"missing or malformed {bad[0]}" if bad else "inconsistent sizes"
            raise ConfigError(f"{file}: not a switchkd teacher cache ({what}); build the cache again")
        self.logp, self.ids, self.offsets = t["logp"], t["ids"].long(), t["offsets"]
        self.row = {int(x): i for i, x in enumerate(t["index"])}
        self.vocab = vocab

    def check_vocab(self, vocab: int) -> None:
        """The cache's vocabulary is the student's (``vocab`` tokens)."""
        if self.meta["vocab"] != vocab:
            raise ConfigError(f"{self.path}: cache was built for vocabulary {self.meta['vocab']}, the student has {vocab}")
        self.vocab = vocab

    def check(self, items: List[Any]) -> None:
        """Every training example (``Tokenized``) is in the cache with as many response tokens (checked
        before training starts)."""
        for x in items:
            r = self.row.get(x.index)
            if r is None:
                raise ConfigError(f"example {x.index} is not in the teacher cache (built for {self.meta['data']})")
            held = int(self.offsets[r + 1] - self.offsets[r])
            if held != len(x.response):
                raise ConfigError(f"teacher cache holds {held} tokens for example {x.index}, the data has "
                                  f"{len(x.response)}: the cache was built with other data or length settings")

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
