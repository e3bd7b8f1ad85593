"""A teacher on a vLLM server: its top-k log-probabilities for teacher-forced targets, its samples for SeqKD.

The server is vLLM's OpenAI-compatible one (``switchkd serve-teacher`` or ``python -m
vllm.entrypoints.openai.api_server --model TEACHER --max-logprobs K``), as TRL's and ms-swift's server
distillation use it: ``/v1/completions`` with a token-id prompt, ``max_tokens: 1`` and ``prompt_logprobs: K``
returns, at every position of the prompt, the K most likely next tokens' log-probabilities keyed by token id and
the log-probability of the token that follows.  :meth:`ServedTeacher.targets` turns that into a
:class:`switchkd.divergences.TopKTail` over a batch's response tokens (the loss reads it as K + 1 outcomes: the
top K and one tail bucket); :meth:`ServedTeacher.sample` samples responses with the run's decoding settings.

Requests carry several rows each and run concurrently (a thread pool over ``urllib``), transient failures are
retried with back-off, and every failure a user can fix ends as :class:`ServerError`, a one-line
:class:`switchkd.config.ConfigError` naming the URL.  :meth:`ServedTeacher.check` runs before the first optimizer
step: something listens, it is a vLLM OpenAI-compatible endpoint, it holds the config's tokenizer (the same ids for
a probe text, the same vocabulary), its ``--max-logprobs`` admits ``teacher.top_k``, and (when given a reference
model) a probe sequence's log-probabilities match it.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from switchkd.sections import ConfigError

#: a text whose tokens exercise the tokenizer (spaces, digits, punctuation, accents, CJK, an emoji, newlines)
PROBE_TEXT = "Distil 12 teachers, naïvely: 蒸馏 — ok?\n\n  Tab\there 🙂 end."
ROWS_PER_REQUEST = 4  # rows sent in one request (vLLM batches a request's prompts); requests run concurrently
CONCURRENCY = 8
RETRIES = 5  # attempts for a transient failure (connection refused/reset, timeout, HTTP 5xx): 1 + 2 + 4 + 8 s apart


class ServerError(ConfigError):
    """The teacher server cannot serve the run (one line naming the URL and what to do)."""


class _Transient(Exception):
    """A failure worth retrying (the server restarting, overloaded or unreachable for a moment)."""


class ServedTeacher:
    """A client of one vLLM server holding the teacher.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        tokenizer: the teacher's tokenizer (the config's ``teacher.name`` / ``teacher.tokenizer``).
        top_k: log-probabilities per position (``teacher.top_k``).
        timeout: seconds a request may take before it is retried.
        retries: attempts for a transient failure.
    """

    served = True  # sources ask the teacher they hold whether it is a server (no forward, no KV cache)

    def __init__(self, url: str, tokenizer: Any, top_k: int = 20, timeout: float = 300.0,
                 retries: int = RETRIES, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.tok, self.top_k, self.timeout, self.retries, self.sleep = tokenizer, top_k, timeout, retries, sleep
        self.model: Optional[str] = None  # the served model's id (``/v1/models``), known after :meth:`check`
        self.requests = 0  # HTTP requests made (diagnostics)

    # -- transport --
    def _call(self, path: str, payload: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Any:
        """One HTTP request (GET without ``payload``, else POST of JSON) -> the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            if exc.code >= 500 or exc.code == 429:
                raise _Transient(f"HTTP {exc.code}: {_message(text)}") from None
            raise ServerError(f"teacher.server={self.url}: {path} answered HTTP {exc.code}: {_message(text)}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out, name not resolved
            reason = getattr(exc, "reason", exc)
            raise _Transient(f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ServerError(f"teacher.server={self.url}: {path} did not answer JSON; is this a vLLM OpenAI-compatible "
                              "server (python -m vllm.entrypoints.openai.api_server, or switchkd serve-teacher)?") from None

    def request(self, path: str, payload: Optional[Dict[str, Any]] = None, attempts: Optional[int] = None) -> Any:
        """:meth:`_call` with retries and exponential back-off on transient failures; :class:`ServerError` after the
        last attempt."""
        attempts = attempts or self.retries
        for i in range(attempts):
            try:
                return self._call(path, payload)
            except _Transient as exc:
                if i == attempts - 1:
                    raise ServerError(f"teacher.server={self.url}: not reachable after {attempts} attempts ({exc}); "
                                      "start it (switchkd serve-teacher) and continue with train.resume=true") from None
                self.sleep(min(2.0 ** i, 30.0))
        raise AssertionError("unreachable")

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> List[Any]:
        """``fn`` over ``items`` concurrently, results in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(CONCURRENCY, len(items))) as pool:
            return list(pool.map(fn, items))

    # -- checks --
    def check(self, vocab: int, reference: Optional[Callable[[List[int]], Any]] = None, tolerance: float = 1e-3) -> None:
        """Refuse, in one line, a server that cannot serve this run.

        Args:
            vocab: the teacher tokenizer's vocabulary size (``len(tokenizer)``).
            reference: optional ``ids -> log-probabilities [len(ids), V]`` of a local copy of the teacher; the
                server's top-k log-probabilities on a probe sequence must match it within ``tolerance``.
        """
        try:
            models = self._call("/v1/models", timeout=min(self.timeout, 30.0))
        except _Transient as exc:
            raise ServerError(f"teacher.server={self.url}: nothing answers there ({exc}); start the teacher with "
                              f"switchkd serve-teacher TEACHER --port PORT") from None
        except ServerError as exc:
            raise ServerError(f"teacher.server={self.url} is not a vLLM OpenAI-compatible server (/v1/models: "
                              f"{str(exc).split(': ', 1)[-1][:120]}); start one with switchkd serve-teacher") from None
        ids = [m.get("id") for m in (models.get("data") or []) if isinstance(m, dict)] if isinstance(models, dict) else []
        if not ids:
            raise ServerError(f"teacher.server={self.url}: /v1/models lists no model; expected a vLLM OpenAI-compatible "
                              "server (switchkd serve-teacher)")
        self.model = ids[0]
        probe = self.tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        served = self.request("/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False})
        if not isinstance(served, dict) or "tokens" not in served:
            raise ServerError(f"teacher.server={self.url}: /tokenize is missing; expected a vLLM OpenAI-compatible server")
        if list(served["tokens"]) != list(probe):
            raise ServerError(f"teacher.server={self.url} serves {self.model!r}, whose tokenizer splits a probe text "
                              f"differently from the config's teacher tokenizer ({len(served['tokens'])} vs {len(probe)} "
                              "tokens); serve the config's teacher or set teacher.name to the served model")
        self._check_vocab(vocab)
        rows = self.logprobs([probe], self.top_k)  # also refuses a --max-logprobs below top_k
        if reference is not None:
            self._check_reference(probe, rows[0], reference, tolerance)

    def _check_vocab(self, vocab: int) -> None:
        """The server's vocabulary ends where the tokenizer's does: id ``vocab - 1`` is read, id ``vocab`` refused."""
        def reads(token: int) -> bool:
            try:
                self.request("/v1/completions", {"model": self.model, "prompt": [token], "max_tokens": 1})
                return True
            except ServerError as exc:
                if "vocabulary" not in str(exc):
                    raise
                return False

        if not reads(vocab - 1) or reads(vocab):
            raise ServerError(f"teacher.server={self.url} serves {self.model!r}, whose vocabulary differs from the "
                              f"config's teacher tokenizer ({vocab} tokens); serve the config's teacher")

    def _check_reference(self, probe: List[int], row: "_Row", reference: Callable[[List[int]], Any],
                         tolerance: float) -> None:
        local = reference(probe)  # [len(probe), V] log-probabilities of the local teacher
        worst = 0.0
        for j, (ids, lps) in enumerate(zip(row.ids, row.logp)):
            if j == 0:
                continue
            for i, lp in zip(ids, lps):
                worst = max(worst, abs(float(local[j - 1][i]) - lp))
        if worst > tolerance:
            raise ServerError(f"teacher.server={self.url} serves {self.model!r}, whose log-probabilities differ from the "
                              f"config's teacher by up to {worst:.3g} on a probe sequence; serve the config's teacher "
                              "(same weights and dtype)")

    # -- teacher-forced log-probabilities --
    def logprobs(self, sequences: Sequence[Sequence[int]], k: Optional[int] = None) -> List["_Row"]:
        """Each sequence's top-``k`` next-token log-probabilities at every position (position j: the distribution
        of token j given tokens < j; position 0 empty) and each token's own log-probability."""
        k = k or self.top_k
        groups = [list(range(i, min(i + ROWS_PER_REQUEST, len(sequences)))) for i in range(0, len(sequences), ROWS_PER_REQUEST)]

        def one(group: List[int]) -> List[_Row]:
            payload = {"model": self.model, "prompt": [list(map(int, sequences[i])) for i in group], "max_tokens": 1,
                       "temperature": 0.0, "prompt_logprobs": k}
            answer = self._completions(payload, k)
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(group):
                raise ServerError(f"teacher.server={self.url}: /v1/completions answered {len(choices)} choices for "
                                  f"{len(group)} prompts")
            return [_Row.parse(c.get("prompt_logprobs"), sequences[i], k, self.url) for c, i in zip(choices, group)]

        return [row for rows in self._map(one, groups) for row in rows]

    def _completions(self, payload: Dict[str, Any], k: int) -> Dict[str, Any]:
        """POST ``/v1/completions``; a ``--max-logprobs`` below ``k`` is refused with what to set."""
        try:
            return self.request("/v1/completions", payload)
        except ServerError as exc:
            text = str(exc)
            if "logprobs" in text and ("max" in text or "greater" in text):
                raise ServerError(f"teacher.server={self.url}: the server returns at most fewer than teacher.top_k={k} "
                                  f"log-probabilities per position ({_tail(text)}); restart it with --max-logprobs {k} "
                                  "or more (switchkd serve-teacher sets it), or lower teacher.top_k") from None
            raise

    def targets(self, batch: Any, vocab: int) -> Any:
        """The teacher's top-k targets at ``batch``'s response tokens: a :class:`~switchkd.divergences.TopKTail`
        with ``logp``, ``ids`` ``[N, top_k]`` and ``token_logp [N]``, rows in the order of ``shifted`` (row-major
        over the batch's response tokens).  The teacher reads ``teacher_input_ids`` when the batch has them (its
        primed prompt)."""
        import torch

        from switchkd.divergences import TopKTail

        primed = batch.teacher_input_ids is not None
        ids = (batch.teacher_input_ids if primed else batch.input_ids).cpu()
        mask = (batch.teacher_attention_mask if primed else batch.attention_mask).cpu()
        labels = (batch.teacher_labels if primed else batch.labels).cpu()
        rows = self.logprobs([r[m.bool()].tolist() for r, m in zip(ids, mask)])
        logp, top, own = [], [], []
        for row, lab, m in zip(rows, labels, mask):
            first = int(m.argmin()) if not bool(m.all()) else len(m)  # right padding: real tokens first
            positions = (lab[:first] != -100).nonzero().flatten().tolist()
            for j in positions:
                if j == 0:
                    raise ValueError("a response token at position 0 has no teacher prediction")
                logp.append(row.logp[j])
                top.append(row.ids[j])
                own.append(row.token_logp[j])
        k = self.top_k
        out = TopKTail(torch.tensor(logp, dtype=torch.float32).reshape(-1, k),
                       torch.tensor(top, dtype=torch.long).reshape(-1, k), vocab,
                       torch.tensor(own, dtype=torch.float32))
        if out.ids.numel() and int(out.ids.max()) >= vocab:
            raise ServerError(f"teacher.server={self.url}: a token id {int(out.ids.max())} beyond the vocabulary "
                              f"({vocab}); serve the config's teacher")
        return out.to(batch.device)

    # -- sampling --
    def _sampling(self, max_new_tokens: int, decoding: Any, eos: List[int]) -> Dict[str, Any]:
        """The ``/v1/completions`` sampling fields for ``decoding``'s settings (greedy: temperature 0)."""
        greedy = not decoding.do_sample
        return {"model": self.model, "max_tokens": int(max_new_tokens), "temperature": 0.0 if greedy else decoding.temperature,
                "top_p": 1.0 if greedy else decoding.top_p, "top_k": -1 if greedy or not decoding.top_k else decoding.top_k,
                "stop_token_ids": eos, "ignore_eos": False, "skip_special_tokens": False, "return_token_ids": True,
                "logprobs": None}

    def _choice(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        """The one choice of a single-prompt ``/v1/completions`` request, with its ``token_ids``."""
        choice = (self.request("/v1/completions", payload).get("choices") or [{}])[0]
        if choice.get("token_ids") is None:
            raise ServerError(f"teacher.server={self.url}: /v1/completions returned no token_ids; expected "
                              "vLLM 0.10 or newer")
        return choice

    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, decoding: Any, eos_token_id: Any,
               seed: Optional[int] = None) -> List[List[int]]:
        """Responses to ``prompts`` (token lists) sampled by the server with ``decoding``'s settings
        (do_sample, temperature, top_k, top_p), at most ``max_new_tokens`` tokens, ending at EOS (kept) or the
        budget.  ``seed`` makes the server's sampling repeatable."""
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        base = self._sampling(max_new_tokens, decoding, eos)

        def one(i: int) -> List[int]:  # one request per row: vLLM seeds every prompt of a request alike
            payload = dict(base, prompt=list(map(int, prompts[i])))
            if seed is not None:
                payload["seed"] = int(seed + i) % (2 ** 31)
            choice = self._choice(payload)
            toks = list(choice["token_ids"])[:max_new_tokens]
            if choice.get("finish_reason") == "stop" and eos and (not toks or toks[-1] not in eos):
                toks = toks + [eos[0]]  # a stop token left out of the answer: the response keeps its EOS
            return toks[:max_new_tokens]

        return self._map(one, list(range(len(prompts))))

    def next_tokens(self, prompts: Sequence[Sequence[int]], decoding: Any, eos_token_id: Any,
                    seed: Optional[int] = None) -> List[Tuple[int, List[int], List[float]]]:
        """One step after each prompt: the token the server samples with ``decoding``'s settings and the teacher's
        top ``top_k`` next-token log-probabilities there (vLLM's raw log-probabilities, before temperature and
        truncation: the same numbers as ``prompt_logprobs``).

        One short request per prompt (concurrent): unlike ``prompt_logprobs``, which vLLM computes over the whole
        prompt without its prefix cache, a sampled step reuses the cached prefix, so a drafted block costs a few
        tokens of prefill per position instead of every row's whole sequence.

        Returns:
            Per prompt ``(token, ids [top_k], logp [top_k])``, the ids by descending log-probability.
        """
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        base = dict(self._sampling(1, decoding, eos), logprobs=self.top_k, return_tokens_as_token_ids=True)

        def one(i: int) -> Tuple[int, List[int], List[float]]:
            payload = dict(base, prompt=list(map(int, prompts[i])))
            if seed is not None:
                payload["seed"] = int(seed + i) % (2 ** 31)
            try:
                choice = self._choice(payload)
            except ServerError as exc:
                if "logprobs" in str(exc):
                    raise ServerError(f"teacher.server={self.url}: the server returns fewer than teacher.top_k="
                                      f"{self.top_k} log-probabilities ({_tail(str(exc))}); restart it with "
                                      f"--max-logprobs {self.top_k} or more") from None
                raise
            toks = list(choice["token_ids"]) or [eos[0] if eos else 0]
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
            ranked = sorted(((int(str(t).rsplit(":", 1)[-1]), float(v)) for t, v in top.items()), key=lambda x: -x[1])
            if len(ranked) < self.top_k:
                raise ServerError(f"teacher.server={self.url}: {len(ranked)} log-probabilities for a sampled token, "
                                  f"fewer than teacher.top_k={self.top_k}")
            ranked = ranked[:self.top_k]
            return int(toks[0]), [t for t, _ in ranked], [max(v, -1e30) if math.isfinite(v) else -1e30 for _, v in ranked]

        return self._map(one, list(range(len(prompts))))


def connect(cfg: Any, tokenizer: Optional[Any] = None) -> ServedTeacher:
    """The run's :class:`ServedTeacher` (``teacher.server``), checked (:meth:`ServedTeacher.check`) against the
    config's teacher tokenizer, which must equal ``tokenizer`` (the student's) when one is given."""
    from switchkd.models import check_compatible, load_tokenizer

    t_tok = load_tokenizer(cfg.teacher)
    if tokenizer is not None:
        check_compatible(tokenizer, t_tok)
    teacher = ServedTeacher(cfg.teacher.server, t_tok, cfg.teacher.top_k, cfg.teacher.timeout, cfg.teacher.retries)
    teacher.check(len(t_tok))
    return teacher


class _Row:
    """One sequence's answer: per position ``ids``/``logp`` (top k, descending) and ``token_logp``."""

    def __init__(self, ids: List[List[int]], logp: List[List[float]], token_logp: List[float]) -> None:
        self.ids, self.logp, self.token_logp = ids, logp, token_logp

    @classmethod
    def parse(cls, entries: Any, sequence: Sequence[int], k: int, url: str) -> "_Row":
        """vLLM's ``prompt_logprobs`` (a list with one dict per prompt position, ``{token id: {logprob, rank}}``,
        None at position 0) -> a row of exactly ``k`` entries per position."""
        if not isinstance(entries, list) or len(entries) != len(sequence):
            raise ServerError(f"teacher.server={url}: /v1/completions returned no prompt_logprobs for a token-id prompt; "
                              "expected a vLLM OpenAI-compatible server")
        ids, logp, own = [[]], [[]], [0.0]
        for j in range(1, len(sequence)):
            entry = entries[j] or {}
            ranked = sorted(((int(t), float(v["logprob"]), int(v.get("rank") or 0)) for t, v in entry.items()),
                            key=lambda x: -x[1])
            top = ranked[:k]
            if len(top) < k:
                raise ServerError(f"teacher.server={url}: {len(top)} log-probabilities at a position, fewer than "
                                  f"teacher.top_k={k}")
            mine = entry.get(str(int(sequence[j]))) or entry.get(int(sequence[j]))
            ids.append([t for t, _, _ in top])
            logp.append([max(v, -1e30) if math.isfinite(v) else -1e30 for _, v, _ in top])
            own.append(float(mine["logprob"]) if mine else -1e30)
        return cls(ids, logp, own)


def _message(text: str) -> str:
    """The ``message`` of an OpenAI-style error body, else the body's first line."""
    try:
        body = json.loads(text)
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        if msg:
            return str(msg).splitlines()[0][:300]
    except (ValueError, AttributeError):
        pass
    return (text.strip().splitlines() or ["(empty)"])[0][:300]


def _tail(text: str) -> str:
    return text.split(": ", 2)[-1][:200]
