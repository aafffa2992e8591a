"""Files that are either whole or absent: what every cache, sample and result writer here needs, so that a
run killed mid-write leaves nothing a rerun would take for finished."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends, and is removed
    if the block fails. Its name ends in ``.tmp``, so no image or cache scan ever takes it for a result."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
