"""Aligning two tokenizations of the same text, for distillation across vocabularies.

Each token of a response covers a run of UTF-8 bytes of its decoded text (:func:`token_bytes`: byte-level
BPE, SentencePiece with byte fallback, byte-level ByT5-style vocabularies; special tokens cover none).  Two
tokenizations of the same text agree on a *boundary* where both have a token ending at the same byte; the
tokens between consecutive shared boundaries form an aligned *group* on each side (a run of student tokens
<-> a run of teacher tokens covering the same bytes).  A boundary is identified by its byte position and
its rank among the tokens ending there, so zero-width tokens (an EOS) pair in order, as TRL GOLD's
``_align_by_byte_offsets`` walk does; tokens after the last shared boundary form one trailing group.
Vectorised with numpy (no Python loop per token).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies spell tokens with it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer: Any) -> List[bytes]:
    """The bytes each vocabulary id contributes to decoded text, indexed by id (``len(tokenizer)`` entries);
    special tokens contribute none."""
    n = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    if type(tokenizer).__name__.startswith("ByT5"):  # ids 3..258 are the bytes 0..255
        return [bytes([i - 3]) if 3 <= i < 259 and i not in special else b"" for i in range(n)]
    byte_level = all(c in BYTE_DECODER for p in pieces[:1000] if p for c in p)
    out: List[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif byte_level:
            out.append(bytes(BYTE_DECODER[c] for c in piece) if all(c in BYTE_DECODER for c in piece)
                       else piece.encode("utf-8"))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def byte_ends(table: Sequence[bytes], ids: Sequence[int]) -> np.ndarray:
    """The byte offset where each token of ``ids`` ends in their concatenated text, ``[n]``."""
    return np.cumsum(np.fromiter((len(table[i]) for i in ids), dtype=np.int64, count=len(ids)))


def align(s_ends: np.ndarray, t_ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Group indices ``(student [n_s], teacher [n_t], number of groups)`` from each side's token byte ends
    (non-decreasing).  Tokens after the last shared boundary get the trailing group ``n_groups - 1`` (only
    when there are such tokens)."""
    scale = (max(len(s_ends), len(t_ends)) + 1) * 2
    ks = s_ends * scale + _rank(s_ends)
    kt = t_ends * scale + _rank(t_ends)
    common = np.intersect1d(ks, kt)
    gs, gt = np.searchsorted(common, ks, side="left"), np.searchsorted(common, kt, side="left")
    trailing = bool((gs == len(common)).any() or (gt == len(common)).any())
    return gs, gt, len(common) + int(trailing)


def _rank(ends: np.ndarray) -> np.ndarray:
    """Each token's rank among the tokens ending at the same byte (0 for the first)."""
    if len(ends) == 0:
        return ends
    start_of_run = np.r_[True, ends[1:] != ends[:-1]]
    run_start = np.maximum.accumulate(np.where(start_of_run, np.arange(len(ends)), 0))
    return np.arange(len(ends)) - run_start


@dataclass
class Alignment:
    """One batch's alignment over its response tokens (row-major, as the loss selects them): the group of each
    student token ``student [N_s]`` and teacher token ``teacher [N_t]`` (batch-global group ids), the number of
    groups ``n``, and which groups have tokens on both sides ``paired [n]`` (the others are left out, as TRL
    GOLD drops groups empty on one side)."""

    student: Any
    teacher: Any
    n: int
    paired: Any
    view: Any = None  # the switchkd.cross.CrossView that built it (its loss and vocabularies)

    def to(self, device: Any, non_blocking: bool = False) -> "Alignment":
        return Alignment(*(t.to(device, non_blocking=non_blocking) for t in (self.student, self.teacher)), self.n,
                         self.paired.to(device, non_blocking=non_blocking), self.view)


def leading_extra(s_bytes: bytes, t_bytes: bytes) -> int:
    """Bytes the teacher's spelling adds in front of the student's (a SentencePiece tokenizer's prefix space),
    when it is the student's text with such a prefix; else 0."""
    extra = len(t_bytes) - len(s_bytes)
    return extra if 0 < extra <= 4 and t_bytes.endswith(s_bytes) and not t_bytes[:extra].strip() else 0


def batch_alignment(s_rows: Sequence[Sequence[int]], t_rows: Sequence[Sequence[int]], s_table: Sequence[bytes],
                    t_table: Sequence[bytes], cut: Sequence[bool] = ()) -> Alignment:
    """The :class:`Alignment` of response token rows on each side (the same texts, tokenized twice; a prefix
    space the teacher's tokenizer adds is discounted); a row whose teacher side was ``cut`` short leaves its
    trailing group unpaired (the two sides' leftovers cover different text)."""
    import torch

    s_all, t_all, offset, unpaired = [], [], 0, []
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        s_ends, t_ends = byte_ends(s_table, s), byte_ends(t_table, t)
        shift = leading_extra(b"".join(s_table[x] for x in s), b"".join(t_table[x] for x in t)) if not (
            i < len(cut) and cut[i]) else 0
        t_ends = np.maximum(t_ends - shift, 0)
        gs, gt, n = align(s_ends, t_ends)
        if i < len(cut) and cut[i] and n and (gs == n - 1).any() and len(t_ends) and s_ends[-1] > t_ends[-1]:
            unpaired.append(offset + n - 1)
        s_all.append(gs + offset)
        t_all.append(gt + offset)
        offset += n
    s_g = torch.from_numpy(np.concatenate(s_all) if s_all else np.zeros(0, np.int64))
    t_g = torch.from_numpy(np.concatenate(t_all) if t_all else np.zeros(0, np.int64))
    paired = (torch.bincount(s_g, minlength=offset) > 0) & (torch.bincount(t_g, minlength=offset) > 0)
    paired[torch.tensor(unpaired, dtype=torch.long)] = False
    return Alignment(s_g, t_g, offset, paired)


NO_BYTES = 256  # the first-byte bucket of tokens that spell no bytes (EOS, special tokens)


class Unspellable(ValueError):
    """Bytes a vocabulary has no tokens for (a byte-level BPE vocabulary without the bytes UTF-8 never uses)."""


class Vocab:
    """One tokenizer's bytes per id, first byte per id ``first [V]`` (256: none), and single-byte ids."""

    def __init__(self, tok: Any, table: Optional[Sequence[bytes]] = None) -> None:
        import torch

        self.tok, self.table = tok, list(table) if table is not None else token_bytes(tok)
        self.first = torch.tensor([t[0] if t else NO_BYTES for t in self.table], dtype=torch.long)
        byte_id: Dict[int, int] = {}
        for i, t in enumerate(self.table):
            if len(t) == 1:
                byte_id.setdefault(t[0], i)
        self.byte_id = byte_id
        eos = tok.eos_token_id
        self.eos = eos if eos is not None else -1

    def spell(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.table[i] for i in ids)

    def encode(self, data: bytes) -> List[int]:
        """Token ids spelling exactly ``data``: the tokenizer's encoding when it spells ``data`` (a prefix space a
        SentencePiece tokenizer adds is dropped with a newline sentinel), else (also for bytes that are not
        UTF-8) one single-byte token per byte."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.encode_bytes(data)
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if self.spell(ids) == data:
            return ids
        ids = list(self.tok("\n" + text, add_special_tokens=False)["input_ids"])
        for k in range(1, min(len(ids), 4) + 1):
            head = self.spell(ids[:k])
            if (head == b"\n" or leading_extra(b"\n", head)) and self.spell(ids[k:]) == data:
                return ids[k:]
        return self._bytewise(data)

    def encode_bytes(self, data: bytes) -> List[int]:
        """Token ids spelling ``data`` whatever it holds: its UTF-8 runs encoded by the tokenizer, each byte that is
        not UTF-8 by its single-byte token."""
        out: List[int] = []
        for part in re.split("([\udc80-\udcff])", data.decode("utf-8", errors="surrogateescape")):
            if len(part) == 1 and "\udc80" <= part <= "\udcff":
                out += self._bytewise(part.encode("utf-8", errors="surrogateescape"))
            elif part:
                out += self.encode(part.encode("utf-8"))
        return out

    def _bytewise(self, data: bytes) -> List[int]:
        if all(b in self.byte_id for b in data):
            return [self.byte_id[b] for b in data]
        raise Unspellable(f"the tokenizer {type(self.tok).__name__} cannot spell {data!r} (no single-byte tokens)")


def partial_utf8(data: bytes) -> bool:
    """Whether ``data`` ends inside a UTF-8 character that more bytes could complete (invalid bytes: False)."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        dec.decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return bool(dec.getstate()[0])
