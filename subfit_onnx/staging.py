"""All-or-nothing output folders: write into a hidden temp folder beside OUT, then rename.

A crash, Ctrl-C or a full disk must never leave a half-written OUT that ``from_pretrained`` would half-load.
The temp folder sits in OUT's parent so the final ``rename`` stays on one file system (atomic, no copy), and a
full disk (ENOSPC, EDQUOT) becomes one ``SubFitError`` line instead of a traceback from deep inside a writer.

A process killed outright (SIGKILL, power loss) cannot clean up after itself, so every scratch folder SubFit makes
carries an owner marker (process id and host). A later run sweeps the folders whose owner is gone before it makes
its own: they can hold a whole export (hundreds of MB) and would otherwise stay forever.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, SubFitError

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def check_output_free(out: Path, overwrite: bool) -> None:
    """Fail before any work if OUT is taken (and ``overwrite`` is off) or cannot be created."""
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if out.exists() and not out.is_dir():
        raise SubFitError(f"{out} exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise SubFitError(f"cannot write into {parent} (permission denied)")


def disk_error(exc: OSError, where: Path) -> SubFitError | None:
    """A user-facing error for a full disk or quota; None for any other OS error (those keep their own text)."""
    if exc.errno in _DISK_FULL:
        return SubFitError(f"no space left on the device while writing {where}; free some space or choose another output")
    return None


OWNER_FILE = ".subfit-owner"
STAGING_PREFIX = ".{name}.tmp-"


def owned_tempdir(prefix: str, parent: str | Path | None = None) -> Path:
    """``mkdtemp`` plus an owner marker, after sweeping the same kind of folder left behind by dead runs."""
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(where, prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    (folder / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return folder


def _owner_gone(folder: Path) -> bool:
    """True only for a folder whose marker names a process on this host that no longer runs."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no marker: not provably ours, leave it alone
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix>*`` folders whose owner process has died; returns what was removed."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        if _owner_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


STAGED = "out"  # inside the work folder: what becomes OUT; siblings (a temporary export) are scratch


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp work folder beside ``out``; on success its ``out`` subfolder becomes ``out``.

    Writers create ``work / STAGED`` themselves (the ONNX rewrite refuses an existing folder); anything else in
    the work folder, such as an intermediate export, is deleted with it.
    """
    final = Path(out)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = owned_tempdir(STAGING_PREFIX.format(name=final.name), final.parent)
    try:
        try:
            yield work
            staged = work / STAGED
            if not staged.is_dir():
                raise SubFitError(f"internal error: nothing was staged for {final}")
            _replace(staged, final, overwrite)
        except OSError as exc:
            mapped = disk_error(exc, final)
            if mapped is None:
                raise
            raise mapped from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(folder: Path) -> None:
    """Temp folders are created private (0700/0600); the result gets the modes the user's umask asks for."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(stage: Path, final: Path, overwrite: bool) -> None:
    _publishable(stage)
    if final.exists():
        if not overwrite:  # appeared while we worked
            raise SubFitError(f"{final} appeared while SubFit was running; nothing was replaced")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        try:
            stage.rename(final)
        except BaseException:
            old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(final)
