"""Methods: one module per sequence source.

A method is **which sequences we train on** (a module here: a :class:`~switchkd.methods.base.Source`
subclass with its config section, rules, rollouts, state and diagnostics) **x which per-token loss**
(``method.divergence``, a pure function of :mod:`switchkd.divergences`).  Adding a source is one
module in this package (found by :data:`MODULES`) and a preset under ``configs/``; nothing else names it.

Imports nothing heavy (torch loads when a source first runs), so the config can be checked first.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from switchkd.methods.base import Source

if TYPE_CHECKING:
    from switchkd.config import Config
    from switchkd.methods.base import Run

#: the method modules: every module of this package but the base
MODULES = tuple(importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
                if info.name != "base")


def _sources() -> Dict[str, type]:
    found: Dict[str, type] = {}
    for module in MODULES:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Source) and value.__module__ == module.__name__:
                found[value.name] = value
    return found


#: ``method.source`` value -> its class
SOURCES: Dict[str, type] = _sources()
#: ``cfg.method.<section>`` -> the dataclass of that section
SECTIONS: Dict[str, type] = {cls.section: cls.Section for cls in SOURCES.values() if cls.section}


def source_class(name: str) -> type:
    """The class of ``method.source=name`` (KeyError for an unknown name; the config check reports it)."""
    return SOURCES[name]


def make_source(cfg: "Config", student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int,
                unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0, run: Optional[Run] = None) -> Source:
    """The source named by ``cfg.method.source`` (``run``: what the trainer tells it about the run)."""
    return SOURCES[cfg.method.source](cfg, student, teacher, tokenizer, vocab, unwrap, seed, run)


__all__ = ["MODULES", "SECTIONS", "SOURCES", "Source", "make_source", "source_class"]
