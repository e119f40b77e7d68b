"""What every ``subfit-onnx`` command shares: exit codes, the one-line error policy, progress and output.

Kept apart from ``cli`` so ``cli_eval`` can use it without importing ``cli`` (which registers ``cli_eval``).
A user error (``SubFitError``, a full disk, out of memory) ends as one stderr line and exit code 1; anything
else is a bug and says so (exit 3); ``--debug`` adds the traceback and the library warnings. Ctrl-C, ``kill``
(SIGTERM) and a closed terminal (SIGHUP) all unwind the same way, so staged outputs and scratch folders are removed
and nothing half-written stays on disk.
"""

from __future__ import annotations

import json
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import SubFitError

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
NOISY_LIBRARIES = ("transformers", "optimum", "torch", "onnxruntime", "datasets", "huggingface_hub", "lm_eval")

Json = Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout (no progress bars)")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks and library warnings")]


class Terminated(KeyboardInterrupt):
    """A terminating signal, raised in the main thread like Ctrl-C so every ``finally`` runs its cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Terminated`` instead of killing the process outright.

    Once one arrives, further ones are ignored until the cleanup it triggers is done (a second ``kill`` must not
    cut the removal of a half-written folder short; SIGKILL still works). Only the main thread may install
    handlers, so elsewhere (a test runner's worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for sig in TERMINATING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def progress_factory(enabled: bool) -> Any:
    from .progress import silent, tqdm_progress

    return tqdm_progress if enabled else silent


def emit(report: dict[str, Any], as_json: bool, human: str | Callable[[dict[str, Any]], str]) -> None:
    """The JSON document with --json, else the people's summary (text, or made from the report)."""
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(human if isinstance(human, str) else human(report))


@contextmanager
def quiet_libraries(debug: bool) -> Iterator[None]:
    """Library warnings (tracer, legacy tokenizer, ...) are noise for people; --debug shows them."""
    if debug:
        yield
        return
    from .quiet import quiet

    with quiet(*NOISY_LIBRARIES, swallow_stdout=False):
        yield


def fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def cli_errors(debug: bool, where: Path | None = None, memory_hint: str = "lower --num-samples/--seq-len",
               after_interrupt: str = "nothing was written") -> Iterator[None]:
    """Turn every failure into one stderr line and an exit code (see module docstring).

    ``where`` names the output folder a disk error is reported against; ``memory_hint`` says which options
    shrink the command's working set; ``after_interrupt`` what an interrupted run leaves behind.
    """
    tail = f"; {after_interrupt}" if after_interrupt else ""
    from .staging import disk_error

    try:
        with quiet_libraries(debug):
            yield
    except typer.Exit:
        raise
    except SubFitError as exc:
        fail(exc.for_cli(), EXIT_USER_ERROR, debug)
    except Terminated as exc:
        fail(f"terminated by {signal.Signals(exc.signum).name}{tail}", exc.exit_code, debug)
    except KeyboardInterrupt:
        fail(f"interrupted{tail}", EXIT_INTERRUPTED, debug)
    except MemoryError:
        fail(f"out of memory; {memory_hint} or use a machine with more memory", EXIT_USER_ERROR, debug)
    except OSError as exc:
        mapped = disk_error(exc, where or Path(exc.filename or "the output"))
        if mapped is not None:
            fail(str(mapped), EXIT_USER_ERROR, debug)
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", EXIT_USER_ERROR, debug)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, with the way to see more
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback",
             EXIT_INTERNAL_ERROR, debug)
