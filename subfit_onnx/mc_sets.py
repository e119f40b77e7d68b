"""The multiple-choice sets the benchmarks score: two BIG-bench tasks, shipped with the package as gzipped JSONL.

``social_iqa`` and ``goal_inference`` (from ``goal_step_wikihow``) came from the ``bigbench==1.0.0`` source
distribution on PyPI until that release left the index (only 0.0.1, without the tasks, is listed now; no other
package on PyPI carries them). BIG-bench is Apache-2.0, so the two converted sets (250 KB gzipped) ship inside
the package instead (``mc_data/``, with its NOTICE), and ``fetch-assets`` needs no download for them. Each line is
one ``{"input", "choices", "label"}`` example, converted as before: the input without the trailing space
BIG-bench leaves before the answer, the choices in ``target_scores`` order, the label the choice scored 1.
The sha256 of each decompressed set is pinned, so the sets the README's accuracy figures came from cannot change
silently.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

from .errors import SubFitError

# task name -> sha256 of its JSONL (the bytes the bigbench 1.0.0 sdist's conversion wrote)
TASKS = {
    "social_iqa": "8628f93349639867c41ffe2a60a6c4803c9dada91d7ce04cf93a99d77d2a4338",
    "goal_inference": "55fc3b77a2bd0db9143926dc6761f5f573718918de2f4051331e8bfbd5367f10",
}


def mc_set_bytes(task: str) -> bytes:
    """The JSONL of a shipped task, checked against its pinned sha256."""
    data = gzip.decompress((resources.files(__package__) / "mc_data" / f"{task}.jsonl.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != TASKS[task]:
        raise SubFitError(f"the shipped multiple-choice set {task} does not match its sha256; reinstall subfit-onnx")
    return data


def fetch_mc_sets(out: Path, scratch: Path) -> None:
    """Write ``<task>.jsonl`` for every task in ``TASKS`` into the new folder ``out`` (``scratch`` is unused: the
    sets ship with the package)."""
    sets = {task: mc_set_bytes(task) for task in TASKS}  # all checked before anything is written
    out.mkdir()
    for task, data in sets.items():
        (out / f"{task}.jsonl").write_bytes(data)
