"""Progress reporting without printing: the core calls a factory, the CLI hands in tqdm.

Library code never writes to the terminal; a build pipeline passes nothing and stays quiet, or passes its own
factory (logging, a UI) with the same two methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int], ProgressBar]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def silent(desc: str, total: int) -> ProgressBar:
    return _Silent()


def tqdm_progress(desc: str, total: int) -> ProgressBar:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@contextmanager
def progress_bar(progress: ProgressFactory, desc: str, total: int) -> Iterator[ProgressBar]:
    """A bar from ``progress``, closed however the block ends (any factory's bars, tqdm's or a caller's)."""
    bar = progress(desc, total)
    try:
        yield bar
    finally:
        bar.close()
