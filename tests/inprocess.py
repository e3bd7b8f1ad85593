"""Uninterrupted reference runs inside the test process (no interpreter start-up), on the CPU and one thread as the
subprocess runs they are compared with (``CUDA_VISIBLE_DEVICES=""``, ``OMP_NUM_THREADS=1``), so that their weights
are bit-comparable."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from switchkd.cli import main


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_here(argv: Sequence[str]) -> None:
    """``switchkd train ARGV`` in this process, on the CPU (a GPU, if any, left alone) and one thread; asserts exit
    status 0."""
    from unittest import mock

    with one_thread(), mock.patch("switchkd.distributed._has_accelerator", return_value=False):
        rc = main(["train", *argv])
    assert rc == 0, f"switchkd train {' '.join(argv)} exited {rc}"
