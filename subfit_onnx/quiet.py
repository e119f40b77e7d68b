"""Silence chatty libraries while library code calls them: the core never writes to the terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*logger_names: str, swallow_stdout: bool = True) -> Iterator[None]:
    """Raise the named loggers to ERROR, drop warnings and swallow stdout; everything is restored afterwards.

    The CLI passes ``swallow_stdout=False``: it prints its own report inside.
    """
    levels = {n: logging.getLogger(n).level for n in logger_names}
    stdout = contextlib.redirect_stdout(io.StringIO()) if swallow_stdout else contextlib.nullcontext()
    try:
        for n in logger_names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), stdout:
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
