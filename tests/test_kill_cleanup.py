"""A killed run leaves nothing on disk: SIGTERM and SIGHUP at every phase of ``optimize``, and stale scratch sweeps.

Each case runs the real CLI in a child process. The child's progress factory is wrapped so that it parks (sleeps)
at a chosen point of a chosen phase and says so through a file; the test then sends the signal. That makes every
phase reachable on a tiny model, where the real phases last milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from subfit_onnx.staging import OWNER_FILE, owned_tempdir, sweep_stale

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import subfit_onnx.cli_common as common
    from subfit_onnx.progress import silent

    phase, after, ready = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

    class Parking:
        def __init__(self, desc):
            self.desc, self.updates = desc, 0
            self.check()
        def check(self):
            if self.desc.startswith(phase) and self.updates == after:
                ready.write_text(self.desc)
                time.sleep(120)
        def update(self, n=1):
            self.updates += n
            self.check()
        def close(self):
            pass

    common.progress_factory = lambda enabled: (lambda desc, total: Parking(desc))
    from subfit_onnx.cli import main
    sys.exit(main(sys.argv[4:]))
""")

# (phase description prefix, park after this many updates): export done, scoring and fitting under way, the
# rewrite's model saved into its temp folder, the plan written but not the report.
PHASES = [("exporting", 1), ("embedding calibration tokens", 0), ("scoring layer 2", 0), ("fitting layer 1", 0),
          ("rewriting", 4), ("saving plan and report", 2)]


def _run_and_signal(tmp_path: Path, argv: list[str], phase: str, after: int, signum: int) -> subprocess.CompletedProcess:
    ready = tmp_path / "ready"
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, phase, str(after), str(ready), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"the run never reached {phase!r} (exit {child.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    child.send_signal(signum)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("phase,after", PHASES, ids=[p for p, _ in PHASES])
def test_sigterm_at_every_phase_leaves_nothing(tmp_path, tiny_checkpoint, tiny_calibration_text, phase, after):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    out = workspace / "out"
    argv = ["optimize", str(tiny_checkpoint("llama")), "-s", "0.5", "-o", str(out), "-c", str(tiny_calibration_text),
            "-n", "8", "-l", "32"]
    result = _run_and_signal(tmp_path, argv, phase, after, signal.SIGTERM)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "terminated by SIGTERM; nothing was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(workspace.iterdir()) == []  # no OUT, no staging folder, no temporary export
    assert _scratch_left(tmp_path / "tmp") == []  # no activation store, no other scratch folder


def test_sighup_during_calibration_leaves_nothing(tmp_path, tiny_export, tiny_calibration_text):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    argv = ["optimize", str(tiny_export("llama")), "-s", "0.5", "-o", str(workspace / "out"),
            "--calibration-backend", "onnx", "-c", str(tiny_calibration_text), "-n", "8", "-l", "32"]
    result = _run_and_signal(tmp_path, argv, "fitting layer 1", 0, signal.SIGHUP)
    assert result.returncode == 128 + signal.SIGHUP, result.stderr[-2000:]
    assert "terminated by SIGHUP" in result.stderr
    assert list(workspace.iterdir()) == []
    assert _scratch_left(tmp_path / "tmp") == []


def _scratch_left(tmp: Path) -> list[Path]:
    """Folders, and anything of ours, in the child's temp dir (libraries may keep small state files there)."""
    return [p for p in tmp.iterdir() if p.is_dir() or p.name.startswith("subfit")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_later_run_sweeps_folders_of_dead_runs_only(tmp_path):
    import socket

    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"x" * 1000)
    (dead / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    alive = tmp_path / ".out.tmp-alive"
    alive.mkdir()
    (alive / OWNER_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    foreign = tmp_path / ".out.tmp-elsewhere"
    foreign.mkdir()
    (foreign / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "another-host"}))
    unmarked = tmp_path / ".out.tmp-unmarked"
    unmarked.mkdir()

    made = owned_tempdir(".out.tmp-", tmp_path)
    assert not dead.exists()
    assert alive.is_dir() and foreign.is_dir() and unmarked.is_dir() and made.is_dir()
    assert json.loads((made / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert sweep_stale(tmp_path, ".out.tmp-") == []  # its own folder is never swept
