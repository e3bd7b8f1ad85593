"""Methods: one module per sequence source.

A method is **which sequences we train on** (a module here: a :class:`~switchkd.methods.base.Source`
subclass with its config section, rules, rollouts, state and diagnostics) **x which per-token loss**
(``method.divergence``, a pure function of :mod:`switchkd.divergences`).  Adding a source is one
module listed in ``MODULES`` and a preset under ``configs/``; nothing else names it.

Imports nothing heavy (torch loads when a source first runs), so the config can be checked first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from switchkd.methods import dataset, distillm, gkd, imitkd, minillm, seqkd, skd, student, switch
from switchkd.methods.base import Source

if TYPE_CHECKING:
    from switchkd.config import Config

#: the method modules, in the order the docs list them
MODULES = (dataset, seqkd, student, imitkd, gkd, distillm, switch, minillm, skd)


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
                unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0) -> Source:
    """The source named by ``cfg.method.source``."""
    return SOURCES[cfg.method.source](cfg, student, teacher, tokenizer, vocab, unwrap, seed)


__all__ = ["MODULES", "SECTIONS", "SOURCES", "Source", "make_source", "source_class"]
