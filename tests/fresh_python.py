"""Run a snippet in a fresh interpreter: import-cost checks need a process that imported nothing yet."""

from __future__ import annotations

import subprocess
import sys


def fresh_python(code: str) -> str:
    """The snippet's stdout, stripped; a failing snippet fails the test with its stderr."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
