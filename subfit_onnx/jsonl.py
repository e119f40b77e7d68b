"""JSON Lines (one JSON object a line): the calibration text reader and the multiple-choice sets share it.

Errors name the file and line, one line each, in the error class the caller's domain uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import SubFitError


def read_jsonl(path: Path, error: type[SubFitError] = SubFitError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is no JSON object raises ``error``."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise error(f"{path}:{n} is not valid JSON") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{n} is not a JSON object")
        yield n, row


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows), encoding="utf-8")
