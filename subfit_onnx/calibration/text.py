"""Calibration and evaluation text: local files or a `datasets` dataset, cut into N x L token windows.

Source syntax (one string, so the CLI and the API share it):
- a path to a ``.txt``/``.utf8``/``.md`` file, a ``.jsonl`` file (field ``text``), or a folder of them;
- ``NAME[:CONFIG[:SPLIT[:COLUMN]]]`` for ``datasets.load_dataset`` (split ``train`` and column ``text`` by default),
  e.g. ``wikitext:wikitext-2-raw-v1:train``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationDataError
from ..jsonl import read_jsonl

TEXT_SUFFIXES = (".txt", ".utf8", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
_DOC_OPEN = re.compile(r"<doc\b[^>]*>")


def _read_text_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if "<doc" in text:  # Wikipedia dumps (e.g. exllamav2's wiki.utf8) wrap articles in <doc> tags
        body = _DOC_OPEN.sub("", text)
        return [d.strip() for d in body.split("</doc>") if d.strip()]
    return [text]


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for n, row in read_jsonl(path, CalibrationDataError):
        if field not in row:
            raise CalibrationDataError(f"{path}:{n} has no {field!r} field")
        docs.append(str(row[field]))
    return docs


def _local_documents(path: Path, field: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise CalibrationDataError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        return [d for f in files for d in _local_documents(f, field)]
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, field)
    return _read_text_file(path)


def _dataset_documents(spec: str) -> list[str]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    column = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets

        ds: Any = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "could not get it"
        raise CalibrationDataError(
            f"could not load dataset {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "pass a local .txt/.jsonl file or folder instead"
        ) from None
    if column not in ds.column_names:
        raise CalibrationDataError(f"dataset {spec!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def load_documents(source: str | Path, field: str = "text") -> list[str]:
    """Documents from a local path or a dataset spec (see module docstring)."""
    path = Path(source).expanduser()
    if path.exists():
        docs = _local_documents(path, field)
    elif any(str(source).endswith(s) for s in TEXT_SUFFIXES + JSONL_SUFFIXES) or "/" in str(source) and ":" not in str(source):
        raise CalibrationDataError(f"calibration source {source} does not exist")
    else:
        docs = _dataset_documents(str(source))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationDataError(f"calibration source {source} holds no text")
    return docs


def tokenize_documents(tokenizer: Any, documents: Iterable[str]) -> np.ndarray:
    """One token stream, documents joined by the EOS token (or a blank line when there is none)."""
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n\n", add_special_tokens=False)
    for doc in documents:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        ids.extend(sep)
    return np.asarray(ids, dtype=np.int64)


def token_windows(stream: np.ndarray, num_samples: int, seq_len: int) -> np.ndarray:
    """``num_samples`` windows of ``seq_len`` tokens spread evenly over the stream, so every part contributes."""
    need = num_samples * seq_len
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError("need at least 1 sample of at least 2 tokens")
    if stream.size < need:
        raise CalibrationDataError(
            f"calibration text has {stream.size} tokens but {num_samples} x {seq_len} = {need} are needed; "
            "give more text or lower --num-samples/--seq-len"
        )
    stride = (stream.size - seq_len) // max(num_samples - 1, 1) if num_samples > 1 else 0
    starts = [min(i * stride, stream.size - seq_len) for i in range(num_samples)]
    return np.stack([stream[s : s + seq_len] for s in starts])


def calibration_tokens(tokenizer: Any, source: str | Path, num_samples: int, seq_len: int) -> np.ndarray:
    return token_windows(tokenize_documents(tokenizer, load_documents(source)), num_samples, seq_len)
