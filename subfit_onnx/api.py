"""The Python API: ``optimize`` (export, calibrate, rewrite), ``calibrate`` (to a plan) and ``rewrite`` (plan onto an export).

These three are what the CLI, ``optimum-cli subfit`` and ``SubFitOptimizer`` call, so every entry point checks
inputs the same way, in the same order: cheap checks on the files first (is it ONNX, a decoder, KV cache, not
fused, a supported family, a free output), then the checkpoint on the meta device and the calibration text, and
only then export, weights and calibration. Outputs are staged beside OUT and renamed at the end.

Nothing here prints; pass a progress factory (``subfit_onnx.progress.tqdm_progress``) to see progress.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from .backends import (
    BACKENDS,
    CalibrationJob,
    choose_backend,
    load_tokenizer,
    load_tokens,
    meta_identity,
    resolve_checkpoint,
)
from .config import SubFitConfig
from .errors import SubFitError
from .graph_checks import load_decoder_structure, require_dense
from .hub import require_hub
from .identity import check_matches, config_facts, export_identity, graph_facts
from .model_config import read_config
from .names import ONNX_FILE, PLAN_FILE, REPORT_FILE, SETTINGS_FILE
from .plan import Plan, load_plan, save_plan
from .progress import ProgressFactory, silent
from .report import build_report
from .sources import Source, default_output, resolve_source
from .staging import STAGED, check_output_free, staged_output

DEFAULT_CALIBRATION = "Salesforce/wikitext:wikitext-2-raw-v1:train"
"""WikiText-2 (train split), the usual calibration set for layer-removal methods; it needs the Hugging Face Hub,
so offline machines pass a local file (``--calibration assets/text/c4_first_half.txt``)."""

DEFAULT_SPARSITY = 0.25


@dataclass
class CalibratedPlan:
    """A plan and its bypass tensors: what ``calibrate`` returns and ``rewrite`` consumes."""

    plan: Plan
    tensors: dict[str, np.ndarray]
    path: Path | None = None
    seconds: float | None = None

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``subfit_plan.json`` and ``subfit_bypass.safetensors`` into ``folder`` (all or nothing)."""
        with staged_output(folder, overwrite) as work:
            save_plan(self.plan, self.tensors, work / STAGED)
        self.path = Path(folder)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> CalibratedPlan:
        plan, tensors = load_plan(path)
        p = Path(path)
        return cls(plan, tensors, p if p.is_dir() else p.parent)


@dataclass
class Result:
    """What ``optimize`` and ``rewrite`` produced: the output folder and the run report."""

    output: Path
    report: dict[str, Any]
    plan: Plan
    files: list[str] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.output / ONNX_FILE

    @property
    def plan_path(self) -> Path:
        return self.output / PLAN_FILE

    @property
    def report_path(self) -> Path:
        return self.output / REPORT_FILE


@dataclass(frozen=True)
class ExportFacts:
    """What the checks learnt about a graph; the graph itself is not kept (it can be gigabytes)."""

    onnx_file: Path
    config: dict[str, Any]  # its config.json
    facts: dict[str, Any]  # identity.graph_facts


def make_config(config: SubFitConfig | None = None, sparsity: float | None = None, **fields: Any) -> SubFitConfig:
    """``config`` with ``sparsity`` and any non-None ``fields`` overriding it; invalid values become one error."""
    updates = {k: v for k, v in {"sparsity": sparsity, **fields}.items() if v is not None}
    try:
        base = config.model_dump() if config is not None else {"sparsity": DEFAULT_SPARSITY}
        return SubFitConfig.model_validate({**base, **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if where == "sparsity":
            raise SubFitError(f"sparsity must be between 0 and 1 (exclusive), got {updates.get('sparsity', '?')}") from None
        raise SubFitError(f"invalid setting {where}: {err['msg']}") from None


def as_calibrated_plan(plan: Any) -> CalibratedPlan:
    """Accept a plan folder or JSON path, a ``CalibratedPlan``, or a ``(Plan, tensors)`` pair."""
    if isinstance(plan, CalibratedPlan):
        return plan
    if isinstance(plan, tuple) and len(plan) == 2 and isinstance(plan[0], Plan):
        return CalibratedPlan(plan[0], plan[1])
    if isinstance(plan, (str, Path)):
        return CalibratedPlan.load(plan)
    raise SubFitError(f"plan must be a path, a CalibratedPlan or (Plan, tensors), not {type(plan).__name__}")


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _localize(src: Source) -> Source:
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


def _export_config(src: Source) -> dict[str, Any]:
    """The export's config.json (an unsupported family stops here, before any heavy work)."""
    config = read_config(src.export_dir) or {}
    config_facts(config)
    return config


def inspect_export(onnx_file: Path) -> ExportFacts:
    """Load the graph once, run the cheap checks and the structural pass, keep only the facts."""
    _, config, structure = load_decoder_structure(onnx_file)
    require_dense(structure, onnx_file)
    return ExportFacts(onnx_file, config, graph_facts(config, structure))


def _check_against(identity: Any, what: str, facts: ExportFacts) -> None:
    check_matches(identity, what, f"the ONNX graph {facts.onnx_file}", facts.facts)


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
        _check_against(identity, f"--model {checkpoint.label}", facts)
    source_text = config.calibration or DEFAULT_CALIBRATION
    tokens = load_tokens(load_tokenizer(checkpoint, export_dir), source_text, config.num_samples, config.seq_len)
    origin = {"checkpoint": checkpoint.label} if checkpoint is not None else {"export": str(export)}
    info = {"source": source_text, **origin, "backend": name}
    return CalibrationJob(checkpoint, name, tokens, identity, params, info, export=export)


def _run_calibration(job: CalibrationJob, config: SubFitConfig, progress: ProgressFactory) -> CalibratedPlan:
    start = time.perf_counter()
    result = BACKENDS[job.backend](job, config, progress)
    return CalibratedPlan(result.plan, result.tensors, seconds=time.perf_counter() - start)


def _settings_of(plan: Plan) -> SubFitConfig | None:
    """The settings a plan was made with (method + calibration data), for ``subfit_config.json``.

    None when SubFit's method did not choose the units (a baseline or a hand-made plan): then there are no
    settings to record.
    """
    if plan.method is None:
        return None
    cal = plan.calibration
    data = {"calibration": cal.get("source"), "num_samples": cal.get("num_samples"), "seq_len": cal.get("seq_len")}
    return SubFitConfig(sparsity=plan.sparsity.target, **plan.method.model_dump(),
                        **{k: v for k, v in data.items() if v is not None})


def _write_outputs(staged: Path, calibrated: CalibratedPlan, config: SubFitConfig | None, report: dict[str, Any],
                   progress: ProgressFactory) -> None:
    bar = progress("saving plan and report", 3)
    try:
        save_plan(calibrated.plan, calibrated.tensors, staged)
        bar.update(1)
        if config is not None:
            (staged / SETTINGS_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        bar.update(1)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        bar.update(1)
    finally:
        bar.close()


def _compress(src: Source, out: Path, config: SubFitConfig, *, calibrated: CalibratedPlan | None,
              job: CalibrationJob | None, facts: ExportFacts | None, overwrite: bool, dtype: str,
              external_data: bool | None, progress: ProgressFactory, started: float, checks: float) -> Result:
    """Shared tail of ``optimize`` and ``rewrite``: export if needed, calibrate if needed, rewrite, save.

    ``checks`` is the time already spent on input checks, tokenization and imports (reported as such).
    """
    from .exporters.optimum_export import export_into
    from .exporters.rewrite import rewrite_into

    seconds: dict[str, float] = {"checks": checks}
    with staged_output(out, overwrite) as work:
        if src.needs_export:
            assert src.path is not None
            with _timed(seconds, "export"):
                onnx_file = export_into(src.path, work / "export", dtype=dtype, progress=progress)  # type: ignore[arg-type]
            with _timed(seconds, "checks"):
                facts = inspect_export(onnx_file)
            if job is not None:
                _check_against(job.identity, f"--model {job.checkpoint.label if job.checkpoint else ''}", facts)
        assert facts is not None
        if calibrated is None:
            assert job is not None
            calibrated = _run_calibration(job, config, progress)
            seconds["calibration"] = calibrated.seconds or 0.0
        else:
            _check_against(calibrated.plan.model, f"the plan {calibrated.path or ''}".rstrip(), facts)
        with _timed(seconds, "rewrite"):
            rewritten = rewrite_into(facts.onnx_file, calibrated.plan, calibrated.tensors, work / STAGED,
                                     external_data=external_data, progress=progress)
        seconds["total"] = time.perf_counter() - started
        report = build_report(
            source=src.given, output=out, plan=calibrated.plan, rewrite=rewritten, seconds=seconds,
            plan_path=str(calibrated.path) if calibrated.path else None, plan_reused=job is None,
            export=None if src.needs_export else str(facts.onnx_file.parent),
            checkpoint=job.checkpoint.label if job is not None and job.checkpoint is not None else None,
        )
        saved_config = config if job is not None else _settings_of(calibrated.plan)
        _write_outputs(work / STAGED, calibrated, saved_config, report, progress)
        files = sorted(p.name for p in (work / STAGED).iterdir())
    return Result(out, report, calibrated.plan, files)


def optimize(source: str | Path, sparsity: float | None = None, *, config: SubFitConfig | None = None,
             model: Any = None, output: str | Path | None = None, plan: Any = None, overwrite: bool = False,
             progress: ProgressFactory | None = None, calibration_backend: str = "auto",
             dtype: str = "fp32", external_data: bool | None = None) -> Result:
    """Compress ``source`` (model.onnx, Optimum export folder, local model folder or hub id) into ``output``.

    ``model`` is the PyTorch checkpoint to calibrate from (path, hub id or a loaded model); by default SOURCE
    when it is a model, else the checkpoint the export's config names. ``plan`` reuses a saved calibration
    (then ``sparsity`` must match it or be None). ``dtype`` applies when SOURCE is a model and is exported here.
    ``calibration_backend``: ``torch`` runs the checkpoint, ``onnx`` runs the export in ONNX Runtime (no checkpoint
    needed), ``auto`` picks torch when a checkpoint is known and onnx otherwise.
    """
    started = time.perf_counter()
    progress = progress or silent
    reused = as_calibrated_plan(plan) if plan is not None else None
    if reused is not None:
        target = reused.plan.sparsity.target
        if sparsity is not None and abs(sparsity - target) > 1e-9:
            raise SubFitError(f"the plan was made for sparsity {target:g}, not {sparsity:g}; drop the sparsity "
                              "or calibrate again")
        sparsity = target
    cfg = make_config(config, sparsity)
    src = resolve_source(source)
    out = Path(output) if output is not None else default_output(src, cfg.sparsity)
    check_output_free(out, overwrite)
    facts = None
    if not src.needs_export:
        _export_config(src)
        facts = inspect_export(src.onnx_file)
    src = _localize(src)
    job = None if reused is not None else prepare_calibration(src, model, cfg, calibration_backend, facts)
    return _compress(src, out, cfg, calibrated=reused, job=job, facts=facts, overwrite=overwrite, dtype=dtype,
                     external_data=external_data, progress=progress, started=started,
                     checks=time.perf_counter() - started)


def calibrate(source: str | Path, sparsity: float | None = None, *, config: SubFitConfig | None = None,
              model: Any = None, output: str | Path | None = None, overwrite: bool = False,
              progress: ProgressFactory | None = None, calibration_backend: str = "auto") -> CalibratedPlan:
    """Calibrate only: a ``CalibratedPlan`` (plan + bypass tensors), saved to ``output`` when given.

    SOURCE may be a model (calibrated directly, no export) or an export (then the checkpoint must match its
    graph). One plan serves every export of the same model, fp32 and fp16 alike.
    """
    progress = progress or silent
    cfg = make_config(config, sparsity)
    src = resolve_source(source)
    if output is not None:
        check_output_free(Path(output), overwrite)
    facts = None
    if not src.needs_export:
        _export_config(src)
        facts = inspect_export(src.onnx_file)
    src = _localize(src)
    job = prepare_calibration(src, model, cfg, calibration_backend, facts)
    calibrated = _run_calibration(job, cfg, progress)
    if output is not None:
        calibrated.save(output, overwrite=overwrite)
    return calibrated


def rewrite(export: str | Path, plan: Any, output: str | Path | None = None, *, overwrite: bool = False,
            progress: ProgressFactory | None = None, external_data: bool | None = None) -> Result:
    """Apply a saved plan to an ONNX export (no torch, no calibration); same output layout as ``optimize``."""
    started = time.perf_counter()
    src = resolve_source(export)
    if src.needs_export:
        raise SubFitError(f"{export} is a model, not an ONNX export; use optimize (it exports first)")
    calibrated = as_calibrated_plan(plan)
    cfg = make_config(None, calibrated.plan.sparsity.target)
    out = Path(output) if output is not None else default_output(src, cfg.sparsity)
    check_output_free(out, overwrite)
    _export_config(src)
    facts = inspect_export(src.onnx_file)
    return _compress(src, out, cfg, calibrated=calibrated, job=None, facts=facts, overwrite=overwrite,
                     dtype="fp32", external_data=external_data, progress=progress or silent, started=started,
                     checks=time.perf_counter() - started)
