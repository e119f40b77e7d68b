"""Where calibration statistics come from: the seam between "which model" and "how it is run".

Two backends: ``torch`` runs the PyTorch checkpoint layer by layer (``calibration.torch_backend``), ``onnx`` runs the
export itself in ONNX Runtime (``calibration.onnx_backend``), so an export alone can be compressed.
``choose_backend`` picks a name (``auto``: torch when a checkpoint is known, else onnx) and ``BACKENDS`` maps it
to a function with the same ``CalibrationJob -> CalibrationResult`` shape.

Everything that can be checked without weights runs first, on a meta-device copy of the model: family,
reachable sparsity and the match with the ONNX graph, so mistakes surface before minutes of loading and export.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_CALIBRATION, SubFitConfig
from .errors import SubFitError
from .graph_checks import ExportFacts
from .hub import require_hub
from .identity import ModelIdentity, export_identity
from .plan import CalibratedPlan
from .progress import ProgressFactory, silent
from .sources import Source, recorded_checkpoint, resolve_source

BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "onnx")

NEEDS_MODEL = (
    "{export} does not name a local PyTorch checkpoint{why}; pass --model with the checkpoint the export was made "
    "from (calibration runs it), --calibration-backend onnx to calibrate the export alone, or --plan with a saved plan"
)


@dataclass
class ModelRef:
    """The PyTorch checkpoint to calibrate from: a local folder or hub id, or a model already in memory."""

    ref: str | None = None
    module: Any = None

    @property
    def label(self) -> str:
        if self.ref is not None:
            return self.ref
        return str(getattr(getattr(self.module, "config", None), "_name_or_path", "") or "<in-memory model>")


@dataclass
class CalibrationJob:
    """Everything a backend needs; built and checked by ``prepare`` before any export or weight loading."""

    checkpoint: ModelRef | None
    backend: str
    tokens: np.ndarray
    identity: ModelIdentity
    unit_params: dict[tuple[int, str], int]
    info: dict[str, Any] = field(default_factory=dict)
    export: Path | None = None  # the model.onnx the onnx backend calibrates
    heldout: np.ndarray | None = None  # windows at the end of the calibration text, clear of calibration's
    bos: int | None = None  # the BOS id every window starts with, when the tokenizer adds one
    budget: Any = None  # a calibration.budget.Budget replacing config.sparsity's parameter budget
    dense: Any = None  # pass 1 of an earlier run of this job (calibration.calibrate.DensePass), reused by the next
    weights: Any = None  # the checkpoint once loaded, for the next run


def resolve_checkpoint(source: Source, model: Any) -> ModelRef | None:
    """``model`` if given, else SOURCE when it is a model, else the checkpoint the export records (or None)."""
    if model is not None and not isinstance(model, (str, Path)):
        return ModelRef(module=model)
    if model is not None:
        ref = resolve_source(model)
        if ref.kind in ("onnx", "export"):
            raise SubFitError(f"--model {model} is an ONNX export; it must be the PyTorch checkpoint")
        return ModelRef(ref.model_ref)
    if source.needs_export:
        return ModelRef(source.model_ref)
    found = recorded_checkpoint(source.export_dir)
    return ModelRef(str(found)) if found is not None else None


def choose_backend(name: str, checkpoint: ModelRef | None, export_dir: Path | None) -> str:
    """The backend that will run: ``auto`` means torch when a checkpoint is known, else onnx on the export."""
    if name not in BACKEND_NAMES:
        raise SubFitError(f"unknown calibration backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "onnx" or (name == "auto" and checkpoint is None and export_dir is not None):
        if export_dir is None:
            raise SubFitError("the onnx calibration backend calibrates an ONNX export; pass model.onnx or an export "
                              "folder as SOURCE, or use --calibration-backend torch")
        return "onnx"
    if checkpoint is None:
        where = str(export_dir) if export_dir is not None else "the export"
        raise SubFitError("--model is needed: " + NEEDS_MODEL.format(export=where, why=_recorded_why(export_dir)))
    return "torch"


def _recorded_why(export_dir: Path | None) -> str:
    if export_dir is None:
        return ""
    from .model_config import read_config

    name = (read_config(export_dir) or {}).get("_name_or_path")
    return f" (its config says {name!r}, which is not a local folder with weights)" if name else " (its config.json has no _name_or_path)"


def _hub_check(ref: ModelRef) -> None:
    if ref.ref is not None and not Path(ref.ref).expanduser().exists():
        require_hub(f"{ref.ref} does not exist locally, and as a hub model id it", "pass a local model folder instead")


def meta_identity(ref: ModelRef) -> tuple[ModelIdentity, dict[tuple[int, str], int], Any]:
    """Identity, unit parameter table and config of the checkpoint, built on the meta device (no weights read)."""
    from .torch_model import model_identity, unit_param_table

    if ref.module is not None:
        return model_identity(ref.module), unit_param_table(ref.module), ref.module.config
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import family_for

    _hub_check(ref)
    try:
        config = AutoConfig.from_pretrained(ref.ref)
    except (OSError, ValueError) as exc:
        raise SubFitError(f"cannot read the model config of {ref.ref} ({str(exc).splitlines()[0][:160]})") from None
    family_for(getattr(config, "model_type", "unknown"))  # unsupported families stop here, by name
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.config._name_or_path = str(ref.ref)
    return model_identity(skeleton), unit_param_table(skeleton), config


def load_tokenizer(ref: ModelRef | None, export_dir: Path | None) -> Any:
    """The checkpoint's tokenizer, else the export's (Optimum copies tokenizer files into exports)."""
    from transformers import AutoTokenizer

    candidates = []
    if ref is not None:
        candidates.append(ref.ref or getattr(ref.module, "name_or_path", None))
    if export_dir is not None:
        candidates.append(str(export_dir))
    errors = []
    for candidate in [c for c in candidates if c]:
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            errors.append(f"{candidate}: {str(exc).splitlines()[0][:100]}")
    raise SubFitError("no tokenizer found for the calibration text; put the tokenizer files beside the model"
                      + (f" ({'; '.join(errors)})" if errors else ""))


def is_dataset_spec(source: str) -> bool:
    """Mirrors ``calibration.text.load_documents``: what is not a local path is a ``datasets`` spec."""
    from .calibration.text import JSONL_SUFFIXES, TEXT_SUFFIXES

    if Path(source).expanduser().exists() or source.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        return False
    return not ("/" in source and ":" not in source)


def load_tokens(tokenizer: Any, source: str, num_samples: int, seq_len: int, heldout: int = 0) -> Any:
    """The calibration windows and ``heldout`` windows of text they do not read (a ``CalibrationSplit``)."""
    from .calibration.text import calibration_split

    if is_dataset_spec(source):
        require_hub(f"calibration source {source!r} is not a local file, and as a dataset it",
                    "pass a local .txt/.jsonl file or folder with --calibration")
    return calibration_split(tokenizer, source, num_samples, seq_len, heldout)


def load_weights(ref: ModelRef) -> Any:
    """The checkpoint in float32 on CPU, eval mode (calibration always runs in fp32, whatever the export dtype)."""
    if ref.module is not None:
        return ref.module
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.ref, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise SubFitError(f"cannot load the model {ref.ref} ({str(exc).splitlines()[0][:160]})") from None
    return model.eval()


def prepare_calibration(src: Source, model: Any, config: SubFitConfig, backend: str,
                        facts: ExportFacts | None) -> CalibrationJob:
    """Every check that needs no weights: backend, checkpoint shape, reachable sparsity, graph match, tokens."""
    from .calibration.selection import check_reachable, target_params

    checkpoint = resolve_checkpoint(src, model)
    export_dir = None if src.needs_export else src.export_dir
    name = choose_backend(backend, checkpoint, export_dir)
    export = None
    if name == "onnx":  # the export alone: identity from its graph and config.json, no checkpoint
        assert facts is not None
        checkpoint, export = None, facts.onnx_file
        identity, params = export_identity(facts.config, facts.facts, export.parent)
    else:
        assert checkpoint is not None
        identity, params, _ = meta_identity(checkpoint)
    check_reachable(params, target_params(sum(params.values()), config.sparsity), config.sparsity)
    if facts is not None and checkpoint is not None:
        facts.check_matches(identity, f"--model {checkpoint.label}")
    source_text = config.calibration or DEFAULT_CALIBRATION
    split = load_tokens(load_tokenizer(checkpoint, export_dir), source_text, config.num_samples, config.seq_len,
                        config.heldout_windows)
    origin = {"checkpoint": checkpoint.label} if checkpoint is not None else {"export": str(export)}
    info = {"source": source_text, **origin, "backend": name}
    return CalibrationJob(checkpoint, name, split.tokens, identity, params, info, export=export,
                          heldout=split.heldout, bos=split.bos)


def run_calibration(job: CalibrationJob, config: SubFitConfig, progress: ProgressFactory) -> CalibratedPlan:
    """Load what the job's backend needs and calibrate; the plan comes back with its wall time."""
    start = time.perf_counter()
    result = BACKENDS[job.backend](job, config, progress)
    return CalibratedPlan(result.plan, result.tensors, seconds=time.perf_counter() - start)


def run_torch(job: CalibrationJob, config: Any, progress: ProgressFactory = silent) -> Any:
    from .calibration.calibrate import calibrate_model

    assert job.checkpoint is not None
    if job.weights is None:
        job.weights = load_weights(job.checkpoint)
    result = calibrate_model(job.weights, job.tokens, config, progress=progress, calibration_info=job.info,
                             budget=job.budget, dense=job.dense)
    job.dense = result.dense
    return result


def run_onnx(job: CalibrationJob, config: Any, progress: ProgressFactory = silent) -> Any:
    from .calibration.onnx_backend import calibrate_export

    assert job.export is not None
    result = calibrate_export(job.export, job.tokens, config, progress=progress, calibration_info=job.info,
                              budget=job.budget, dense=job.dense)
    job.dense = result.dense
    return result


BACKENDS: dict[str, Callable[..., Any]] = {"torch": run_torch, "onnx": run_onnx}
