"""SFT, word-level KD and BiLD: the dataset's own responses, unchanged (``source: dataset``)."""

from __future__ import annotations

from typing import ClassVar

from switchkd.methods.base import Source


class DatasetSource(Source):
    """Ground-truth responses, unchanged; the only source whose teacher targets may come from
    ``method.teacher_cache`` (its sequences are known before training)."""

    name: ClassVar[str] = "dataset"
    fixed_sequences: ClassVar[bool] = True
