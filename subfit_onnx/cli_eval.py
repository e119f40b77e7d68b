"""``evaluate`` and ``benchmark`` commands; ``subfit_onnx.cli`` adds them to its app with ``register(app)``.

Both work on any Optimum ``text-generation-with-past`` export folder (model.onnx + config.json + tokenizer),
dense or SubFit-rewritten. Same conventions as the main CLI: a user error (``SubFitError``) is one line on stderr
and exit code 1, anything else is a bug and says so (exit 3), ``--debug`` adds the traceback and library
warnings; ``--json`` puts only the JSON document on stdout and shows no progress bars. This module does not
import ``cli`` (which imports it), so it can be registered on any ``typer.Typer``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import Debug, cli_errors, emit
from .cli_common import progress_factory as _progress
from .errors import SubFitError

DEFAULT_WINDOWS = 48  # kept equal to evaluation.perplexity's defaults (not imported: --help stays light)
DEFAULT_WINDOW_LEN = 256


class ProviderChoice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


ModelDir = Annotated[Path, typer.Argument(help="Optimum export folder (model.onnx, config.json, tokenizer)",
                                          show_default=False)]
Reference = Annotated[Path | None, typer.Option(
    "--reference", help="dense export of the same model (`subfit-onnx export MODEL`); adds its numbers and "
    "model/reference ratios", show_default="none: no ratios")]
Provider = Annotated[ProviderChoice, typer.Option("--provider", help="ONNX Runtime execution provider")]
Json = Annotated[bool, typer.Option("--json", help="print the results as JSON on stdout (no progress bars)")]


def _errors(debug: bool) -> Any:
    return cli_errors(debug, memory_hint="lower --windows/--window-len", after_interrupt="")


def evaluate(
    model_dir: ModelDir,
    reference: Reference = None,
    text: Annotated[Path | None, typer.Option(
        "--text", help="perplexity text: a .txt/.utf8/.md/.jsonl file or a folder of them", show_default="none")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="perplexity text from datasets: NAME[:CONFIG[:SPLIT[:COLUMN]]]", show_default="none")] = None,
    tasks: Annotated[list[Path] | None, typer.Option(
        "--tasks", help='multiple-choice JSONL, one {"input", "choices", "label"} a line; repeat for more',
        show_default="none")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="score only the first N items of each task", show_default="all items")] = None,
    windows: Annotated[int, typer.Option(
        "--windows", min=1, help="perplexity windows, spread evenly over the whole text")] = DEFAULT_WINDOWS,
    window_len: Annotated[int, typer.Option(
        "--window-len", min=2, help="tokens per window; each window is scored on its own")] = DEFAULT_WINDOW_LEN,
    provider: Provider = ProviderChoice.cpu,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Perplexity and multiple-choice accuracy of an ONNX export, with ratios to a dense --reference."""
    with _errors(debug):
        if text is not None and dataset is not None:
            raise SubFitError("give --text or --dataset, not both")
        from .evaluation.evaluate import evaluate_export
        from .evaluation.report import evaluation_table

        result = evaluate_export(model_dir, reference=reference, text=text if text is not None else dataset,
                                 tasks=tasks or [], windows=windows, window_len=window_len, limit=limit,
                                 provider=provider.value, progress=_progress(not as_json))
        emit(result, as_json, evaluation_table)


def benchmark(
    model_dir: ModelDir,
    reference: Reference = None,
    provider: Provider = ProviderChoice.cpu,
    repeats: Annotated[int, typer.Option(
        "--repeats", min=1, help="interleaved repetitions (reference and model alternate); medians reported")] = 5,
    runtimes: Annotated[bool, typer.Option(
        "--runtimes", help="also compare tokens/s of the raw ORT loop, Optimum (defaults / tuned) and "
                           "onnxruntime-genai")] = False,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", min=1, help="tokens generated per generate measurement")] = 64,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Prefill/decode latency, generate tokens/s, KV-cache bytes and file size, with ratios to --reference."""
    with _errors(debug):
        from .evaluation.benchmark import BenchmarkSettings, run_benchmark
        from .evaluation.report import benchmark_table, runtimes_table

        progress = _progress(not as_json)
        settings = BenchmarkSettings(provider=provider.value, repeats=repeats, generate_tokens=new_tokens)
        report = run_benchmark(model_dir, reference, settings, progress=progress).to_dict()
        if runtimes:
            from .evaluation.runtimes import benchmark_runtimes

            report["runtimes"] = benchmark_runtimes(model_dir, reference, provider=provider.value,
                                                    new_tokens=new_tokens, repeats=repeats,
                                                    progress=progress).to_dict()

        def human(r: dict[str, Any]) -> str:
            return benchmark_table(r) + ("\n\n" + runtimes_table(r["runtimes"]) if "runtimes" in r else "")

        emit(report, as_json, human)


def genai_config(
    model_dir: ModelDir,
    provider: Provider = ProviderChoice.cpu,
    debug: Debug = False,
) -> None:
    """Write genai_config.json so onnxruntime-genai loads the export (KV-index gaps included)."""
    with _errors(debug):
        from .runtime_genai import write_genai_config

        path = write_genai_config(model_dir, provider=provider.value)
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add ``evaluate``, ``benchmark`` and ``genai-config`` to ``app`` (``subfit_onnx.cli`` calls this)."""
    app.command("evaluate")(evaluate)
    app.command("benchmark")(benchmark)
    app.command("genai-config")(genai_config)
