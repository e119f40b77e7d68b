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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .backends import CalibrationJob, prepare_calibration, run_calibration
from .budget_targets import budget_report, build_budget, output_tag
from .config import BUDGET_FLAGS, DEFAULT_WARN_PPL_RATIO, SubFitConfig, make_config
from .errors import SubFitError
from .exporters.quantize import check_precision
from .graph_checks import ExportFacts, check_export_family, inspect_export
from .names import ONNX_FILE, PLAN_FILE, REPORT_FILE, SETTINGS_FILE
from .plan import CalibratedPlan, Plan, as_calibrated_plan, save_plan
from .progress import ProgressFactory, progress_bar, silent
from .report import build_report
from .sources import Source, default_export_output, default_output, localize, resolve_source
from .staging import STAGED, check_output_free, staged_output


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


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _write_outputs(staged: Path, calibrated: CalibratedPlan, config: SubFitConfig | None, report: dict[str, Any],
                   progress: ProgressFactory) -> None:
    with progress_bar(progress, "saving plan and report", 3) as bar:
        save_plan(calibrated.plan, calibrated.tensors, staged)
        bar.update(1)
        if config is not None:
            (staged / SETTINGS_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        bar.update(1)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        bar.update(1)


@dataclass
class _Run:
    """One ``optimize``, ``calibrate`` or ``rewrite`` call once the checks they share have passed (``_prepare``)."""

    source: Source
    output: Path | None
    config: SubFitConfig
    facts: ExportFacts | None  # the export's, when SOURCE is one (a model is exported inside the run)
    overwrite: bool
    progress: ProgressFactory
    started: float
    dtype: str = "fp32"  # export precision when SOURCE is a model
    layout: str = "optimum"  # export layout when SOURCE is a model: "optimum" or "builder" (exporters.builder_export)
    external_data: bool | None = None
    warn_ppl_ratio: float | None = DEFAULT_WARN_PPL_RATIO
    quantize: str | None = None  # "int4" | "int8": quantize the rewritten weights


def _prepare(source: str | Path, config: SubFitConfig, output: str | Path | None, *, overwrite: bool,
             progress: ProgressFactory | None, started: float, default_output_folder: bool = True,
             export_only: bool = False) -> _Run:
    """What every entry point checks first, cheapest first: SOURCE, the output, the export's family and graph.

    A hub model id becomes a local snapshot last, after every check that needs no download.
    """
    src = resolve_source(source)
    if export_only and src.needs_export:
        raise SubFitError(f"{source} is a model, not an ONNX export; use optimize (it exports first)")
    out = Path(output) if output is not None else default_output(src, config.sparsity, tag=output_tag(config)) \
        if default_output_folder else None
    if out is not None:
        check_output_free(out, overwrite)
    facts = None
    if not src.needs_export:
        check_export_family(src.export_dir)
        facts = inspect_export(src.onnx_file)
    return _Run(localize(src), out, config, facts, overwrite, progress or silent, started)


def _compress(run: _Run, calibrated: CalibratedPlan | None = None, job: CalibrationJob | None = None) -> Result:
    """Shared tail of ``optimize`` and ``rewrite``: export if needed, calibrate if needed, rewrite, save.

    Everything lands in one staged folder. The report's ``checks`` seconds include what ``_prepare`` spent.
    """
    from .exporters.optimum_export import export_into
    from .exporters.rewrite import rewrite_into

    src, out, progress, facts = run.source, run.output, run.progress, run.facts
    assert out is not None and (calibrated is not None or job is not None)
    seconds: dict[str, float] = {"checks": time.perf_counter() - run.started}
    with staged_output(out, run.overwrite) as work:
        if src.needs_export:
            assert src.path is not None
            with _timed(seconds, "export"):
                if run.layout == "builder":
                    from .exporters.builder_export import export_fused_into

                    onnx_file = export_fused_into(src.path, work / "export")
                else:
                    onnx_file = export_into(src.path, work / "export", dtype=run.dtype, progress=progress)  # type: ignore[arg-type]
            with _timed(seconds, "checks"):
                facts = inspect_export(onnx_file)
            if job is not None:
                facts.check_matches(job.identity, f"--model {job.checkpoint.label if job.checkpoint else ''}")
        assert facts is not None
        costs = search = None
        if calibrated is None and run.config.budget == "max_ppl_ratio":
            assert job is not None
            calibrated, rewritten, quality, search = _search_quality(run, job, facts, work, seconds)
        else:
            if calibrated is None:
                assert job is not None
                with _timed(seconds, "unit costs"):
                    job.budget, costs = build_budget(run.config, facts.onnx_file, progress, run.quantize)
                calibrated = run_calibration(job, run.config, progress)
                seconds["calibration"] = calibrated.seconds or 0.0
            with _timed(seconds, "rewrite"):  # checks the plan against the graph first
                rewritten = rewrite_into(facts.onnx_file, calibrated.plan, calibrated.tensors, work / STAGED,
                                         external_data=run.external_data, quantize=run.quantize, progress=progress)
            with _timed(seconds, "quality"):
                quality = _heldout_quality(run, job, facts, work / STAGED)
        seconds["total"] = time.perf_counter() - run.started
        report = build_report(
            source=src.given, output=out, plan=calibrated.plan, rewrite=rewritten, seconds=seconds,
            plan_path=str(calibrated.path) if calibrated.path else None, plan_reused=job is None,
            export=None if src.needs_export else str(facts.onnx_file.parent),
            checkpoint=job.checkpoint.label if job is not None and job.checkpoint is not None else None,
            quality=quality,
        )
        with _timed(seconds, "budget check"):
            budget = budget_report(calibrated.plan, costs, facts.onnx_file.parent, work / STAGED, report,
                                   run.config.context, progress)
        if budget is not None:
            report["budget"] = {**budget, **({"search": search} if search else {})}
            report["seconds"]["budget check"] = round(seconds["budget check"], 3)
        saved_config = run.config if job is not None else calibrated.plan.settings()
        _write_outputs(work / STAGED, calibrated, saved_config, report, progress)
        files = sorted(p.name for p in (work / STAGED).iterdir())
    return Result(out, report, calibrated.plan, files)


def _search_quality(run: _Run, job: CalibrationJob, facts: ExportFacts, work: Path,
                    seconds: dict[str, float]) -> tuple[CalibratedPlan, Any, dict[str, Any], list[dict[str, Any]]]:
    """``--max-ppl-ratio``: calibrate, rewrite and measure candidate sparsities; the best lands in ``STAGED``."""
    import shutil

    from .evaluation.heldout import DENSE_FROM_EXPORT, heldout_quality
    from .exporters.rewrite import rewrite_into
    from .quality_budget import Trial, search_sparsity

    assert run.config.max_ppl_ratio is not None and job.heldout is not None
    onnx_file = facts.onnx_file
    made: dict[float, tuple[CalibratedPlan, Any, Any, Path]] = {}
    dense: list[tuple[float, str]] = []  # the dense perplexity and what it was measured on, once known

    def measure(sparsity: float) -> Trial:
        config = run.config.model_copy(update={"sparsity": sparsity, "max_ppl_ratio": None})
        calibrated = run_calibration(job, config, run.progress)
        seconds["calibration"] = seconds.get("calibration", 0.0) + (calibrated.seconds or 0.0)
        folder = work / f"trial-{len(made)}"
        with _timed(seconds, "rewrite"):
            rewritten = rewrite_into(onnx_file, calibrated.plan, calibrated.tensors, folder,
                                     external_data=run.external_data, quantize=run.quantize, progress=run.progress)
        with _timed(seconds, "quality"):
            ppl, source = (dense[0] if dense else _checkpoint_dense_ppl(job, facts)) or (None, DENSE_FROM_EXPORT)
            quality = heldout_quality(onnx_file.parent, folder, job.heldout, job.bos, run.warn_ppl_ratio,
                                      run.progress, dense_ppl=ppl, dense_from=source)
        dense[:] = [(quality.dense_ppl, quality.dense_from)]
        made[sparsity] = (calibrated, rewritten, quality, folder)
        return Trial(sparsity, quality.ratio, len(calibrated.plan.removed))

    best, trials = search_sparsity(measure, run.config.max_ppl_ratio)
    calibrated, rewritten, quality, folder = made[best.sparsity]
    folder.rename(work / STAGED)
    for other in {f for *_, f in made.values()} - {folder}:
        shutil.rmtree(other, ignore_errors=True)
    plan = calibrated.plan.model_copy(update={"budget": {
        "objective": "quality", "request": f"held-out perplexity at most {run.config.max_ppl_ratio:g}x dense",
        "unit": "x dense perplexity", "target": run.config.max_ppl_ratio, "saved": quality.ratio, "total": None}})
    curve = [{"sparsity": t.sparsity, "units_removed": t.units, "heldout_ppl_ratio": round(t.ratio, 4)}
             for t in trials]
    return (CalibratedPlan(plan, calibrated.tensors, seconds=calibrated.seconds), rewritten,
            {"measured": True, **quality.as_report()}, curve)


def _heldout_quality(run: _Run, job: CalibrationJob | None, facts: ExportFacts, compressed: Path) -> dict[str, Any]:
    """The report's ``quality``: the held-out perplexity ratio to dense, or why it was not measured."""
    if job is None:
        return {"measured": False, "why": "the plan was reused, so there is no calibration text to hold out"}
    if not run.config.heldout_windows:
        return {"measured": False, "why": "heldout_windows is 0"}
    if job.heldout is None:
        return {"measured": False, "why": "the calibration text is too short for the calibration and the "
                "held-out windows; give more text to measure held-out quality"}
    from .evaluation.heldout import DENSE_FROM_EXPORT, heldout_quality

    ppl, source = _checkpoint_dense_ppl(job, facts) or (None, DENSE_FROM_EXPORT)
    return {"measured": True, **heldout_quality(facts.onnx_file.parent, compressed, job.heldout, job.bos,
                                                run.warn_ppl_ratio, run.progress, dense_ppl=ppl,
                                                dense_from=source).as_report()}


HELDOUT_LOGITS = 64 * 2**20  # logits (float32) the dense held-out run holds at once: about 256 MB


def _checkpoint_dense_ppl(job: CalibrationJob, facts: ExportFacts) -> tuple[float, str] | None:
    """The dense held-out perplexity from the PyTorch checkpoint the torch backend loaded, when the export is fp32
    (it then computes what the checkpoint computes); None otherwise, and the dense export is measured instead.

    Measured on SmolLM2's 16 x 256 held-out tokens: 5.6-6.9 s in PyTorch against 9.0 s to load and run the
    export in ONNX Runtime, the perplexities 4e-8 apart.
    """
    if job.weights is None or job.heldout is None or facts.weights_dtype != "FLOAT":
        return None
    import torch

    from .evaluation.heldout import DENSE_FROM_CHECKPOINT
    from .torch_eval import torch_perplexity

    if next(job.weights.parameters()).dtype != torch.float32:
        return None
    logits_per_window = job.heldout.shape[1] * job.weights.get_output_embeddings().weight.shape[0]
    batch = max(1, HELDOUT_LOGITS // logits_per_window)  # Gemma's 262k vocabulary: 268 MB of logits a window
    return torch_perplexity(job.weights, job.heldout, batch_size=batch), DENSE_FROM_CHECKPOINT


def optimize(source: str | Path, sparsity: float | None = None, *, config: SubFitConfig | None = None,
             model: Any = None, output: str | Path | None = None, plan: Any = None, overwrite: bool = False,
             progress: ProgressFactory | None = None, calibration_backend: str = "auto",
             dtype: str = "fp32", external_data: bool | None = None,
             warn_ppl_ratio: float | None = DEFAULT_WARN_PPL_RATIO, target_speedup: float | None = None,
             kv_budget: float | None = None, max_ppl_ratio: float | None = None,
             context: int | None = None, quantize: str | None = None, layout: str | None = None) -> Result:
    """Compress ``source`` (model.onnx, Optimum export folder, local model folder or hub id) into ``output``.

    ``model`` is the PyTorch checkpoint to calibrate from (path, hub id or a loaded model); by default SOURCE
    when it is a model, else the checkpoint the export's config names. ``plan`` reuses a saved calibration
    (then ``sparsity`` must match it or be None). ``dtype`` applies when SOURCE is a model and is exported here.
    ``calibration_backend``: ``torch`` runs the checkpoint, ``onnx`` runs the export in ONNX Runtime (no checkpoint
    needed), ``auto`` picks torch when a checkpoint is known and onnx otherwise. The report's ``quality`` is the
    held-out perplexity ratio to the dense export (``evaluation.heldout``); above ``warn_ppl_ratio`` (None: never)
    it carries ``warning: true``. ``quantize`` ("int4" or "int8") quantizes the compressed model's weights
    (``exporters.quantize``; the held-out quality is measured on the quantized model); a bad value is refused first.
    ``layout`` ("optimum" or "builder", with a model SOURCE only) is the export's layout, as in ``export``: "builder"
    exports onnxruntime-genai's fused layout, the fastest int4 deployment on CPU.

    Instead of ``sparsity``, one budget (also settable in ``config``): ``target_speedup`` (decode that many times
    faster at ``context`` tokens, unit costs measured on the export), ``kv_budget`` (keep at most that fraction
    of the KV cache) or ``max_ppl_ratio`` (the most removed while the held-out perplexity ratio stays within it).
    """
    started = time.perf_counter()
    check_precision(quantize)
    _check_layout(layout, dtype)
    config = make_config(config, None, target_speedup=target_speedup, kv_budget=kv_budget,
                         max_ppl_ratio=max_ppl_ratio, context=context)
    if config.budget is not None and (sparsity is not None or plan is not None):
        raise SubFitError(f"give {'--sparsity' if sparsity is not None else '--plan'} or "
                          f"{BUDGET_FLAGS[config.budget]}, not both")
    reused = as_calibrated_plan(plan) if plan is not None else None
    if reused is not None:
        target = reused.plan.sparsity.target
        if sparsity is not None and abs(sparsity - target) > 1e-9:
            raise SubFitError(f"the plan was made for sparsity {target:g}, not {sparsity:g}; drop the sparsity "
                              "or calibrate again")
        sparsity = target
    if warn_ppl_ratio is not None and not warn_ppl_ratio > 0:
        raise SubFitError(f"the perplexity ratio to warn above must be positive, not {warn_ppl_ratio:g}")
    run = replace(_prepare(source, make_config(config, sparsity), output, overwrite=overwrite, progress=progress,
                           started=started), dtype=dtype, external_data=external_data, warn_ppl_ratio=warn_ppl_ratio,
            quantize=quantize, layout=layout or "optimum")
    if layout is not None and not run.source.needs_export:
        raise SubFitError(f"{source} is already an ONNX export; --layout applies when SOURCE is a model "
                          "(export it with `subfit-onnx export --layout`)")
    if reused is not None:
        return _compress(run, calibrated=reused)
    job = prepare_calibration(run.source, model, run.config, calibration_backend, run.facts)
    if run.config.budget == "max_ppl_ratio" and job.heldout is None:
        raise SubFitError("--max-ppl-ratio measures quality on calibration text that calibration does not read, "
                          "and there is none: give more calibration text, fewer --num-samples, or --heldout-windows "
                          "above 0")
    return _compress(run, job=job)


def calibrate(source: str | Path, sparsity: float | None = None, *, config: SubFitConfig | None = None,
              model: Any = None, output: str | Path | None = None, overwrite: bool = False,
              progress: ProgressFactory | None = None, calibration_backend: str = "auto") -> CalibratedPlan:
    """Calibrate only: a ``CalibratedPlan`` (plan + bypass tensors), saved to ``output`` when given.

    SOURCE may be a model (calibrated directly, no export) or an export (then the checkpoint must match its
    graph). One plan serves every export of the same model, fp32 and fp16 alike.
    """
    config = make_config(config, sparsity)
    if config.budget is not None:
        raise SubFitError(f"{BUDGET_FLAGS[config.budget]} is measured on the rewritten model; use optimize for it "
                          "(calibrate takes --sparsity)")
    run = _prepare(source, config, output, overwrite=overwrite, progress=progress,
                   started=time.perf_counter(), default_output_folder=False)
    job = prepare_calibration(run.source, model, run.config, calibration_backend, run.facts)
    calibrated = run_calibration(job, run.config, run.progress)
    if run.output is not None:
        calibrated.save(run.output, overwrite=overwrite)
    return calibrated


def rewrite(export: str | Path, plan: Any, output: str | Path | None = None, *, overwrite: bool = False,
            progress: ProgressFactory | None = None, external_data: bool | None = None,
            quantize: str | None = None) -> Result:
    """Apply a saved plan to an ONNX export (no torch, no calibration); same output layout as ``optimize``;
    ``quantize`` as there."""
    started = time.perf_counter()
    check_precision(quantize)
    calibrated = as_calibrated_plan(plan)
    run = _prepare(export, make_config(None, calibrated.plan.sparsity.target), output, overwrite=overwrite,
                   progress=progress, started=started, export_only=True)
    return _compress(replace(run, external_data=external_data, quantize=quantize), calibrated=calibrated)


EXPORT_LAYOUTS = ("optimum", "builder")


def _check_layout(layout: str | None, dtype: str) -> None:
    if layout is not None and layout not in EXPORT_LAYOUTS:
        raise SubFitError(f"layout must be one of {', '.join(EXPORT_LAYOUTS)}, not {layout!r}")
    if layout == "builder" and dtype != "fp32":
        raise SubFitError("the builder layout is exported at fp32 (quantize it with optimize/rewrite --quantize)")


def export(model: str | Path, output: str | Path | None = None, *, dtype: str = "fp32", overwrite: bool = False,
           progress: ProgressFactory | None = None, layout: str = "optimum") -> Path:
    """Export a model (local folder or hub id) as Optimum does for SubFit; returns the export folder.

    This is the dense reference ``evaluate``/``benchmark --reference`` compare against, and a SOURCE that
    ``optimize``/``rewrite`` take without exporting again. Default ``output``: ``<model folder>-onnx`` beside
    the model (``-onnx-fp16`` for fp16). ``layout="builder"`` writes onnxruntime-genai's fused model-builder
    layout instead (``exporters.builder_export``; fp32 only).
    """
    from .exporters.optimum_export import DTYPES, export_decoder

    if dtype not in DTYPES:
        raise SubFitError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    _check_layout(layout, dtype)
    src = resolve_source(model)
    if not src.needs_export:
        raise SubFitError(f"{model} is already an ONNX export; export takes a PyTorch model folder or hub id")
    out = Path(output) if output is not None else default_export_output(src, dtype, layout)
    check_output_free(out, overwrite)
    src = localize(src)
    assert src.path is not None
    if layout == "builder":
        from .exporters.builder_export import export_fused

        return export_fused(src.path, out, overwrite=overwrite).parent
    return export_decoder(src.path, out, dtype=dtype, overwrite=overwrite,  # type: ignore[arg-type]
                          progress=progress or silent).parent
