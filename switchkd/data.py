"""Instruction data: reading, format detection, prompt templates, tokenization, batching.

Length policy (MiniLLM's): an example whose prompt is longer than
``max_prompt_length`` tokens is dropped; a response that would make the sequence
longer than ``max_length`` is cut (its EOS is then lost).  Both counts are
reported in :class:`DataStats`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from switchkd.batch import Batch, left_pad, right_pad  # noqa: F401  (the data pipeline's padding)
from switchkd.records import FORMATS, Example  # noqa: F401  (re-exported: readers return Examples)
from switchkd.sections import ConfigError, DataConfig

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
@dataclass
class DataStats:
    total: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0
    truncated_response: int = 0

    def line(self, name: str) -> str:
        return (f"{name}: {self.kept}/{self.total} examples kept, {self.dropped_long_prompt} dropped (prompt too long), "
                f"{self.truncated_response} responses truncated")


def read_records(source: str) -> List[Dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet file or a hub dataset id (``id`` or ``id:split``)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if path.is_dir():
            raise ConfigError(f"{source}: is a directory; expected a .jsonl, .json or .parquet file")
        if not path.is_file():
            raise ConfigError(f"{source}: data file not found")
        if path.suffix == ".parquet":
            return _read_parquet(path)
        return _read_json(path)
    import datasets

    name, _, split = source.partition(":")
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as exc:  # datasets raises many types for a missing/offline dataset
        raise ConfigError(f"{source}: not a local file and not loadable as a dataset ({str(exc).splitlines()[0]})") from None


def _read_parquet(path: Path) -> List[Dict[str, Any]]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt or empty files
        raise ConfigError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not rows:
        raise ConfigError(f"{path}: no examples (empty dataset)")
    return rows


def _read_json(path: Path) -> List[Dict[str, Any]]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raise ConfigError(f"{path}: a gzip-compressed file; decompress it first (gunzip)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("{"):  # one object (on one line or several), or JSONL
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            raise ConfigError(f"{path}: holds one JSON object; expected a list of examples ([{{...}}, ...]) or JSONL "
                              "(one object per line)")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ConfigError(f"{path}: item {bad + 1} of the JSON list is a {type(rows[bad]).__name__}; expected an object per example")
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
            except RecursionError:
                raise ConfigError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(rows[-1], dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object per line")
    if not rows:
        raise ConfigError(f"{path}: no examples (empty dataset)")
    return rows


def detect_format(row: Dict[str, Any], where: str) -> str:
    """The first format whose required fields ``row`` has."""
    for name, required in FORMATS.items():
        if all(k in row for k in required):
            return name
    accepted = "; ".join(f"{n}: {', '.join(r)}" for n, r in FORMATS.items())
    raise ConfigError(f"{where}: record has fields {sorted(row)}; none of the accepted formats match ({accepted}); "
                      "map your field names with data.fields (e.g. data.fields.instruction=question) or eval's "
                      "--field instruction=question")


def render_prompt(template: str, instruction: str, inp: str) -> str:
    """Apply a named template (``alpaca``, ``none``) or a custom ``{instruction}``/``{input}`` string
    (``chat``, which needs the tokenizer, is applied in :func:`to_example`)."""
    if template == "alpaca":
        return (ALPACA_INPUT if inp else ALPACA).format(instruction=instruction, input=inp)
    if template == "none":
        return instruction + ("\n" + inp if inp else "")
    return template.format(instruction=instruction, input=inp)


def resolve_template(template: str, tokenizer: Any) -> str:
    """``data.template`` with ``auto`` resolved: ``chat`` when ``tokenizer`` has a chat template, else ``alpaca``."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def to_example(row: Dict[str, Any], fmt: str, cfg: DataConfig, tokenizer: Any, where: str) -> Example:
    """Normalise one record of format ``fmt`` into an :class:`Example`."""
    missing = [k for k in FORMATS[fmt] if k not in row]
    if missing:
        raise ConfigError(f"{where}: missing field '{missing[0]}' for format {fmt} (required: {', '.join(FORMATS[fmt])}; "
                          f"the record has {', '.join(sorted(map(str, row))) or 'none'}): map your field names with "
                          "data.fields, e.g. data.fields={instruction: question, output: answer} (eval: --field "
                          "instruction=question), or set data.format (auto detects {', '.join(FORMATS)}; messages "
                          "include ShareGPT conversations)")
    meta = {k: row[k] for k in ("topic", "category") if k in row}
    if fmt == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects with string "
                              "values")
        if msgs[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: 'messages' must end with an assistant message")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where}: chat data ('messages') needs a tokenizer with a chat template; this one has none "
                              "(use instruction/output records, or a chat model's tokenizer)")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return Example(prompt=prompt, references=[msgs[-1]["content"]], instruction=msgs[-2]["content"], meta=meta)
    if fmt == "dolly":
        instruction, inp, out = row["instruction"], row.get("context", "") or "", row["response"]
    else:
        instruction, inp, out = row["instruction"], row.get("input", "") or "", row["output"]
    if not isinstance(instruction, str) or not isinstance(inp, str):
        raise ConfigError(f"{where}: 'instruction' and 'input'/'context' must be strings, got "
                          f"{type(instruction).__name__} and {type(inp).__name__}")
    refs = list(out) if isinstance(out, list) else [out]
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ConfigError(f"{where}: the reference answer must be a string or a non-empty list of strings")
    template = resolve_template(cfg.template, tokenizer)
    if template == "alpaca" and isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    elif template == "chat":  # one user turn through the tokenizer's chat template
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where}: data.template=chat needs a tokenizer with a chat template; this one has none "
                              "(use data.template=alpaca or none)")
        user = instruction + ("\n\n" + inp if inp else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = render_prompt(template, instruction, inp)
    return Example(prompt=prompt, references=refs, instruction=instruction, meta=meta, context=inp)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _remap(row: Dict[str, Any], fields: Dict[str, str]) -> Dict[str, Any]:
    """Add canonical field names from the user's mapping ``{canonical: source}``; a ShareGPT record
    (``conversations``: ``[{from, value}]``) also gets ``messages`` (``[{role, content}]``)."""
    row = row | {canon: row[src] for canon, src in fields.items() if src in row}
    turns = row.get("conversations")
    if "messages" not in row and isinstance(turns, list) and all(isinstance(t, dict) and "from" in t for t in turns):
        row["messages"] = [{"role": SHAREGPT_ROLES.get(str(t["from"]), str(t["from"])), "content": t.get("value")}
                           for t in turns]
    return row


def load_examples(source: str, cfg: DataConfig, tokenizer: Any, limit: Optional[int] = None) -> List[Example]:
    """Read ``source`` (or a built-in suite: ``synthetic[:split]``, ``arith[:split]``) into examples."""
    if source.split(":")[0] in ("synthetic", "arith"):
        if source.startswith("arith"):
            from switchkd.arith import make_split
        else:
            from switchkd.synthetic import make_split

        split = source.partition(":")[2] or "train"
        n = cfg.synthetic_size if split == "train" else max(cfg.synthetic_size // 10, 50)
        return make_split(split, min(n, limit or n), cfg.seed)
    rows = [_remap(r, cfg.fields) for r in read_records(source)]
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0], f"{source}:1")
    out = [to_example(r, fmt, cfg, tokenizer, f"{source}:{i + 1}") for i, r in enumerate(rows[:limit] if limit else rows)]
    if not out:
        raise ConfigError(f"{source}: no examples (empty dataset)")
    return out


def encode_prompt(tokenizer: Any, prompt: str) -> List[int]:
    """Prompt token ids with the tokenizer's own leading specials (e.g. Llama's BOS), never a trailing EOS."""
    ids = tokenizer(prompt)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


@dataclass
class Tokenized:
    """Token ids of one training example; ``response`` ends with EOS unless truncated.

    ``teacher_prompt`` is the primed prompt the teacher sees (None: the same prompt).
    """

    prompt: List[int]
    response: List[int]
    index: int
    teacher_prompt: Optional[List[int]] = None


def tokenize(examples: Sequence[Example], tokenizer: Any, max_prompt: int, max_length: int,
             priming: str = "none", teacher_tokenizer: Any = None) -> tuple:
    """Tokenize with the length policy; returns ``(list[Tokenized], DataStats)``.  With
    ``teacher_tokenizer`` (a teacher of another vocabulary) each item's ``teacher_prompt`` is the prompt
    (primed or not) as the teacher's tokenizer and chat template render it."""
    from tqdm.auto import tqdm

    from switchkd.priming import teacher_prompt

    stats, out = DataStats(total=len(examples)), []
    for i, ex in enumerate(tqdm(examples, desc="tokenize", leave=False, disable=len(examples) < 2000)):
        p = encode_prompt(tokenizer, ex.prompt)
        if len(p) > max_prompt:
            stats.dropped_long_prompt += 1
            continue
        r = tokenizer(ex.references[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) + len(r) > max_length:
            r = r[: max_length - len(p)]
            stats.truncated_response += 1
        t_text = ex.prompt if priming == "none" else teacher_prompt(priming, ex.prompt, ex.references[0])
        tp = encode_prompt(teacher_tokenizer or tokenizer, t_text) if priming != "none" or teacher_tokenizer else None
        out.append(Tokenized(p, r, i, tp))
    stats.kept = len(out)
    if not out:
        raise ConfigError(f"no example fits max_prompt_length={max_prompt} (all {stats.total} prompts are longer)")
    return out, stats


def build_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                index: Sequence[int], teacher_prompts: Optional[Sequence[Sequence[int]]] = None) -> Batch:
    """A training :class:`~switchkd.batch.Batch` of prompt + response token lists."""
    return Batch.build(prompts, responses, pad_id, index, teacher_prompts)


def collate(items: Sequence[Tokenized], pad_id: int) -> Batch:
    """:func:`build_batch` for tokenized dataset examples."""
    primed = items[0].teacher_prompt is not None
    return build_batch([x.prompt for x in items], [x.response for x in items], pad_id, [x.index for x in items],
                       [x.teacher_prompt for x in items] if primed else None)
