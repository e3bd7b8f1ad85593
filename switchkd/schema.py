"""The config schema: each field's type, default, range, choices and help, declared once next to the field.

A config field is declared with :func:`opt` in its dataclass (``switchkd/config.py`` for the shared
sections, each method module for its own section).  From these declarations come the range checks
(:func:`rules`), the choice checks (:func:`choices`), the ``eval`` command's flags and help
(:func:`add_flags`) and the configuration reference in ``docs/configuration.md`` (:func:`markdown`,
``python -m switchkd.config``).  Imports nothing heavy, so a config is checked before torch loads.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

Rule = Tuple[Callable[[Any], bool], str]
Choices = Union[Sequence[str], Callable[[], Sequence[str]]]


FINITE_TEXT = "a finite number"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gt(lo: float) -> Rule:
    """A finite number > ``lo``."""
    return (lambda v: _num(v) and v > lo), f"a finite number > {lo:g}"


def ge(lo: float) -> Rule:
    """A finite number >= ``lo``."""
    return (lambda v: _num(v) and v >= lo), f"a finite number >= {lo:g}"


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: the end excluded)."""
    def ok(v: Any) -> bool:
        return _num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok, f"a value in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    fn, text = rule
    return (lambda v: v is None or fn(v)), f"{text} (or null)"


COUNT, COUNT0 = ge(1), ge(0)
PROB = in_range(0.0, 1.0)
SEED = in_range(0, 2**32 - 1)


def opt(default: Any = dataclasses.MISSING, help: str = "", *, rule: Optional[Rule] = None,
        choices: Optional[Choices] = None, factory: Optional[Callable[[], Any]] = None,
        section: Optional[type] = None) -> Any:
    """A dataclass field with its schema: ``help`` text, a range ``rule``, ``choices`` (a sequence or a
    function returning one, for registries), ``factory`` for mutable defaults, and ``section``: the
    dataclass of an optional nested section (``teacher``)."""
    md = {"help": help, "rule": rule, "choices": choices, "section": section}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


@dataclasses.dataclass
class Entry:
    """One leaf field of the tree: its dotted ``key``, the dataclass ``field`` and its default."""

    key: str
    field: dataclasses.Field
    default: Any
    optional_section: Optional[str]  # "teacher" for teacher.* (checked only when the section is set)

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def rule(self) -> Optional[Rule]:
        return self.field.metadata.get("rule")

    @property
    def choices(self) -> Optional[Sequence[str]]:
        c = self.field.metadata.get("choices")
        return tuple(c()) if callable(c) else (tuple(c) if c is not None else None)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def entries(cls: type, prefix: str = "", optional_section: Optional[str] = None) -> Iterator[Entry]:
    """Every leaf field of the dataclass tree ``cls`` (sections recursed into), in declaration order."""
    for f in dataclasses.fields(cls):
        default = _default(f)
        sub = f.metadata.get("section") or (type(default) if dataclasses.is_dataclass(default) else None)
        if sub is not None:
            inner = optional_section or (f"{prefix}{f.name}" if f.metadata.get("section") else None)
            yield from entries(sub, f"{prefix}{f.name}.", inner)
        else:
            yield Entry(f"{prefix}{f.name}", f, default, optional_section)


def rules(cls: type) -> Dict[str, Tuple[Rule, Optional[str]]]:
    """``{dotted key: (rule, optional section)}`` for every field declaring a range."""
    return {e.key: (e.rule, e.optional_section) for e in entries(cls) if e.rule is not None}


def choices(cls: type) -> Dict[str, Tuple[Sequence[str], Optional[str]]]:
    """``{dotted key: (choices, optional section)}`` for every field declaring choices."""
    return {e.key: (e.choices, e.optional_section) for e in entries(cls) if e.choices is not None}


def get(cfg: Any, dotted: str) -> Any:
    """The value at ``dotted`` in a config tree (None below an unset optional section)."""
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def type_name(f: dataclasses.Field) -> str:
    """A short, readable name of a field's type (``int``, ``float?``, ``list[str]``)."""
    text = str(f.type).replace("typing.", "")
    for long, short in (("Optional[", "?["), ("List[", "list["), ("Dict[", "dict["), ("Union[bool, str]", "bool|str")):
        text = text.replace(long, short)
    if text.startswith("?[") and text.endswith("]"):
        text = text[2:-1] + "?"
    return text


def _show(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v == int(v) and abs(v) < 1e15:
        return f"{v:g}"
    return str(v)


def markdown(cls: type) -> str:
    """The configuration reference: one table row per field (key, type, default, valid values, meaning)."""
    rows = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    optional_sections = []
    for e in entries(cls):
        if e.optional_section:  # an optional section repeating another dataclass: one row, then the fields it adds
            f = next(f for f in dataclasses.fields(cls) if f.name == e.optional_section)
            if e.optional_section not in optional_sections:
                optional_sections.append(e.optional_section)
                rows.append(f"| `{e.optional_section}.*` | section | `—` | | {f.metadata.get('help', '')} |")
            if e.key.count(".") > 1 or e.key.split(".")[-1] not in _own_fields(f.metadata["section"]):
                continue
        valid = ", ".join(f"`{c}`" for c in e.choices) if e.choices else (e.rule[1] if e.rule else "")
        meaning = e.help.replace("|", "\\|")
        rows.append(f"| `{e.key}` | {type_name(e.field)} | `{_show(e.default)}` | {valid} | {meaning} |")
    return "\n".join(rows) + "\n"


def _own_fields(section: type) -> set:
    """The fields a dataclass declares beyond those of the dataclasses it extends."""
    inherited = {f.name for base in section.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return {f.name for f in dataclasses.fields(section)} - inherited


def add_flags(parser: Any, cls: type, names: Sequence[str], defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add ``--name`` flags to an argparse ``parser`` for the fields ``names`` of dataclass ``cls``: type,
    choices and help from the schema (``defaults`` override the dataclass's)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names:
        f, default = fields[name], (defaults or {}).get(name, _default(fields[name]))
        kind = hints[name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        e = Entry(name, f, default, None)
        shown = f" (default {_show(default)})" if default is not None and "default" not in e.help else ""
        kw: Dict[str, Any] = {"default": default, "help": f"{e.help}{shown}".strip()}
        if e.choices:
            kw["choices"] = list(e.choices)
        if base in (int, float):
            kw["type"] = _checked(base, e.rule, name)
        parser.add_argument(f"--{name.replace('_', '-')}", **kw)


def _checked(kind: type, rule: Optional[Rule], name: str) -> Callable[[str], Any]:
    """An argparse ``type``: parse ``kind`` and check the field's rule (an argparse error otherwise)."""
    import argparse

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if rule is not None and not rule[0](value):
            raise argparse.ArgumentTypeError(f"expected {rule[1]}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse

