"""Silence chatty libraries while library code calls them: the core never writes to the terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR, drop warnings and swallow stdout; everything is restored afterwards."""
    levels = {n: logging.getLogger(n).level for n in logger_names}
    try:
        for n in logger_names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
