"""One intra-op thread for the small evaluation networks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one torch thread: the feature classifiers' matmuls are far too small to share (a
    second thread makes them slower, many times slower when the other core is busy), and one thread makes
    their training bit-reproducible whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
