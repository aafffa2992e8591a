"""What every script here does with the errors a user can cause."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def user_errors_exit(program: str, *errors: type[Exception]) -> Iterator[None]:
    """Expected user errors (``ValueError``, ``FileNotFoundError`` and ``errors``) raised in the block end the
    program with one readable line, ``<program>: error: <message>``, and exit status 1, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, *errors) as err:
        sys.exit(f"{program}: error: {' '.join(str(err).split())}")
