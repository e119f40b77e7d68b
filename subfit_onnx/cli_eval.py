"""``evaluate`` and ``benchmark`` commands; ``subfit_onnx.cli`` adds them to its app with ``register(app)``.

Both work on any Optimum ``text-generation-with-past`` export folder (model.onnx + config.json + tokenizer),
dense or SubFit-rewritten. Same conventions as the main CLI: a user error (``SubFitError``) is one line on stderr
and exit code 1, anything else is a bug and says so (exit 3), ``--debug`` adds the traceback and library
warnings; ``--json`` puts only the JSON document on stdout and shows no progress bars. This module does not
import ``cli`` (which imports it), so it can be registered on any ``typer.Typer``.
"""

from __future__ import annotations

import json
import logging
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import SubFitError

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
DEFAULT_WINDOWS = 48  # kept equal to evaluation.perplexity's defaults (not imported: --help stays light)
DEFAULT_WINDOW_LEN = 256


class ProviderChoice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


ModelDir = Annotated[Path, typer.Argument(help="Optimum export folder (model.onnx, config.json, tokenizer)",
                                          show_default=False)]
Reference = Annotated[Path | None, typer.Option(
    "--reference", help="dense export of the same model; adds its numbers and model/reference ratios",
    show_default=False)]
Provider = Annotated[ProviderChoice, typer.Option("--provider", help="ONNX Runtime execution provider")]
Json = Annotated[bool, typer.Option("--json", help="print the results as JSON on stdout (no progress bars)")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks and library warnings")]


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """One stderr line and an exit code for every failure; library warnings hidden unless --debug."""
    names = ("transformers", "optimum", "torch", "onnxruntime", "datasets", "huggingface_hub", "lm_eval")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        if not debug:
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            yield
    except typer.Exit:
        raise
    except SubFitError as exc:
        _fail(str(exc), EXIT_USER_ERROR, debug)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED, debug)
    except MemoryError:
        _fail("out of memory; lower --windows/--window-len or use a machine with more memory", EXIT_USER_ERROR, debug)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, with the way to see more
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        _fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback",
              EXIT_INTERNAL_ERROR, debug)
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _progress(enabled: bool) -> Any:
    from .progress import silent, tqdm_progress

    return tqdm_progress if enabled else silent


def _emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else human(data))


def evaluate(
    model_dir: ModelDir,
    reference: Reference = None,
    text: Annotated[Path | None, typer.Option(
        "--text", help="perplexity text: a .txt/.utf8/.md/.jsonl file or a folder of them", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="perplexity text from datasets: NAME[:CONFIG[:SPLIT[:COLUMN]]]", show_default=False)] = None,
    tasks: Annotated[list[Path] | None, typer.Option(
        "--tasks", help='multiple-choice JSONL, one {"input", "choices", "label"} a line; repeat for more',
        show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="score only the first N items of each task", show_default=False)] = None,
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
        _emit(result, as_json, evaluation_table)


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

        _emit(report, as_json, human)


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
