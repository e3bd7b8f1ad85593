"""SFT, word-level KD and BiLD: the dataset's own responses, unchanged (``source: dataset``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from switchkd.methods.base import Needs, Source

if TYPE_CHECKING:
    from switchkd.config import Config


class DatasetSource(Source):
    """Ground-truth responses, unchanged; the only source whose teacher targets may come from
    ``method.teacher_cache`` (its sequences are known before training)."""

    name: ClassVar[str] = "dataset"

    @classmethod
    def needs(cls, cfg: "Config") -> Needs:
        return Needs(teacher_cache=None)  # its sequences are known before training
