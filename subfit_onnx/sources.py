"""What the user pointed at: an ONNX file, an Optimum export folder, a local checkpoint or a hub id.

The CLI and the API accept all four as SOURCE, so this module decides which one it is once, from the file system
alone (no torch, no onnx), and finds the PyTorch checkpoint that calibration needs. Errors name the path and what
was expected there, because a wrong path is the most common mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import SubFitError
from .hub import require_hub
from .model_config import read_config
from .names import CONFIG_FILE, ONNX_FILE

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

SourceKind = Literal["onnx", "export", "checkpoint", "hub"]


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE. ``onnx`` and ``export`` have a graph already; the other two must be exported first."""

    kind: SourceKind
    given: str
    path: Path | None = None  # the .onnx file, the export folder or the checkpoint folder; None for a hub id

    @property
    def needs_export(self) -> bool:
        return self.kind in ("checkpoint", "hub")

    @property
    def onnx_file(self) -> Path:
        assert self.path is not None and not self.needs_export
        return self.path if self.kind == "onnx" else self.path / ONNX_FILE

    @property
    def export_dir(self) -> Path:
        return self.onnx_file.parent

    @property
    def model_ref(self) -> str:
        """What ``from_pretrained`` takes for a model source."""
        return str(self.path) if self.path is not None else self.given

    @property
    def stem(self) -> str:
        """Base name for default outputs: the folder (or hub repo) name, never ``model``."""
        if self.kind == "hub":
            return self.given.rstrip("/").split("/")[-1]
        assert self.path is not None
        return (self.path.parent if self.kind == "onnx" else self.path).resolve().name


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def is_checkpoint_dir(folder: Path) -> bool:
    """A transformers folder: config.json plus weights (and no ONNX graph, which makes it an export)."""
    return folder.is_dir() and (folder / CONFIG_FILE).is_file() and has_weights(folder)


def resolve_source(source: str | Path) -> Source:
    given = str(source)
    path = Path(given).expanduser()
    if path.is_file():
        if path.suffix != ".onnx":
            raise SubFitError(f"{given} is not an ONNX file (expected a model.onnx, an export folder or a model)")
        return Source("onnx", given, path)
    if path.is_dir():
        if (path / ONNX_FILE).is_file():
            return Source("export", given, path)
        others = sorted(p.name for p in path.glob("*.onnx"))
        if others:
            raise SubFitError(
                f"{given} has no {ONNX_FILE} but has {', '.join(others[:3])}; pass the .onnx file itself"
            )
        if is_checkpoint_dir(path):
            return Source("checkpoint", given, path)
        raise SubFitError(
            f"{given} is neither an ONNX export (no {ONNX_FILE}) nor a model folder (config.json and weights)"
        )
    looks_like_path = given.startswith((".", "/", "~")) or given.endswith((".onnx", ".json")) or given.count("/") > 1
    if looks_like_path or not _HUB_ID.match(given):
        raise SubFitError(f"{given} does not exist")
    return Source("hub", given)


def recorded_checkpoint(export_dir: Path) -> Path | None:
    """The local checkpoint an export names in its config (``_name_or_path``), if it still exists with weights."""
    config = read_config(export_dir) or {}
    for key in ("_name_or_path", "name_or_path"):
        value = config.get(key)
        if isinstance(value, str) and value:
            candidate = Path(value).expanduser()
            if not candidate.is_absolute():
                candidate = (export_dir / candidate) if (export_dir / candidate).exists() else candidate
            if is_checkpoint_dir(candidate):
                return candidate
    return None


def default_export_output(source: Source, dtype: str = "fp32", layout: str = "optimum") -> Path:
    """``<model folder>-onnx`` (``-onnx-fp16``, ``-onnx-builder``) beside the model (the working directory for a
    hub id)."""
    name = f"{source.stem}-onnx" + ("" if dtype == "fp32" else f"-{dtype}") + ("" if layout == "optimum" else f"-{layout}")
    return Path(name) if source.kind == "hub" or source.path is None else source.path.parent / name


def default_output(source: Source, sparsity: float, suffix: str = "", tag: str | None = None) -> Path:
    """``<source folder>-subfit<percent>`` beside the source (the working directory for a hub id); ``tag``
    replaces the percent (a budget: ``-speed1.3``)."""
    percent = f"{sparsity * 100:.1f}".rstrip("0").rstrip(".") if tag is None else tag
    name = f"{source.stem}-subfit{percent}{suffix}"
    if source.kind == "hub" or source.path is None:
        return Path(name)
    parent = source.path.parent.parent if source.kind == "onnx" else source.path.parent
    return parent / name


def localize(src: Source) -> Source:
    """A hub model id becomes a local snapshot (the exporter and calibration read local folders)."""
    if src.kind != "hub":
        return src
    require_hub(f"{src.given} does not exist locally, and as a hub model id it",
                "pass a local model folder or ONNX export instead")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(src.given, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "could not get it"
        raise SubFitError(f"could not download {src.given} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    return Source("checkpoint", src.given, Path(path))
