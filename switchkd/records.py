"""Instruction records: the accepted file formats and the :class:`Example` every reader produces.

Imports nothing heavy: the config names the formats (``data.format``) and the built-in suites
(:mod:`switchkd.synthetic`, :mod:`switchkd.arith`) build examples without the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

#: record format -> the fields it requires
FORMATS: Dict[str, tuple] = {
    "minillm": ("instruction", "output"),  # + optional input, prompt
    "dolly": ("instruction", "response"),  # + optional context
    "messages": ("messages",),
}


@dataclass
class Example:
    """One instruction: the rendered prompt, its reference answers, and extra fields."""

    prompt: str
    references: List[str]
    instruction: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)
    context: str = ""  # the record's input / context, when it has one
