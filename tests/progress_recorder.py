"""A progress factory for tests: which bars were opened, their totals, and how far each got."""

from __future__ import annotations

from collections.abc import Callable


class Recorder:
    """``bars`` maps each description to ``[done, total]`` in the order the bars were opened.

    ``on_update(desc)`` runs at every update, for tests that check the process state while work is under way.
    """

    def __init__(self, on_update: Callable[[str], None] | None = None) -> None:
        self.bars: dict[str, list[int]] = {}
        self.on_update = on_update

    def __call__(self, desc: str, total: int):
        progress = self.bars.setdefault(desc, [0, total])
        on_update = self.on_update

        class Bar:
            def update(self, n: int = 1) -> None:
                progress[0] += n
                if on_update is not None:
                    on_update(desc)

            def close(self) -> None:
                pass

        return Bar()

    def done(self, prefix: str) -> set[int]:
        """How far the bars whose description starts with ``prefix`` got."""
        return {done for desc, (done, _) in self.bars.items() if desc.startswith(prefix)}
