"""The multiple-choice sets the benchmarks score: two BIG-bench tasks, fetched from PyPI, as JSONL.

``social_iqa`` and ``goal_inference`` (from ``goal_step_wikihow``) ship inside the ``bigbench==1.0.0`` source
distribution on PyPI, so a clone needs neither the Hugging Face hub nor files outside the repository. pip 26
refuses to download that sdist (its metadata declares a direct-URL dependency, which pip rejects for files from
PyPI), so it is fetched from the package index's simple API (PEP 503; ``PIP_INDEX_URL`` is honoured) and checked
against the sha256 the index lists. Each example becomes one ``{"input", "choices", "label"}`` line: the input
without the trailing space BIG-bench leaves before the answer, the choices in ``target_scores`` order, the label
the choice scored 1.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tarfile
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from .errors import SubFitError
from .jsonl import write_jsonl

BIGBENCH = ("bigbench", "1.0.0")
TASKS = {
    "social_iqa": "bigbench/benchmark_tasks/social_iqa/task.json",
    "goal_inference": "bigbench/benchmark_tasks/goal_step_wikihow/goal_inference/task.json",
}
_CHUNK = 1 << 20


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def download_sdist(project: str, version: str, dest: Path, timeout: float = 60.0) -> Path:
    """``project-version.tar.gz`` from the package index into ``dest``, verified against the index's sha256."""
    page_url = f"{_index_url()}/{project}/"
    name = f"{project}-{version}.tar.gz"
    try:
        with urllib.request.urlopen(page_url, timeout=timeout) as response:
            page = response.read().decode("utf-8", errors="replace")
        links = [html.unescape(href) for href in re.findall(r'href="([^"]+)"', page)]
        link = next((href for href in links if href.split("#")[0].rsplit("/", 1)[-1] == name), None)
        if link is None:
            raise SubFitError(f"the package index lists no {name} ({page_url})")
        url, _, fragment = link.partition("#")
        expected = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
        path, digest = dest / name, hashlib.sha256()
        with urllib.request.urlopen(urljoin(page_url, url), timeout=timeout) as response, path.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise SubFitError(f"could not download {name} from the package index ({exc})") from None
    if expected is not None and digest.hexdigest() != expected:
        raise SubFitError(f"{name} from the package index does not match its sha256; try again")
    return path


def mc_rows(task: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A BIG-bench multiple-choice task's examples as ``{"input", "choices", "label"}`` rows."""
    rows = []
    for n, example in enumerate(task.get("examples", [])):
        scores = example.get("target_scores") or {}
        best = [i for i, score in enumerate(scores.values()) if score == 1]
        if len(scores) < 2 or len(best) != 1:
            raise SubFitError(f"BIG-bench task {name}, example {n}: expected one choice scored 1 among two or more")
        rows.append({"input": example["input"].rstrip(), "choices": list(scores), "label": best[0]})
    if not rows:
        raise SubFitError(f"BIG-bench task {name} holds no examples")
    return rows


def fetch_mc_sets(out: Path, scratch: Path) -> None:
    """Write ``<task>.jsonl`` for every task in ``TASKS`` into the new folder ``out``."""
    sdist = download_sdist(*BIGBENCH, scratch)
    prefix = f"{BIGBENCH[0]}-{BIGBENCH[1]}/"
    wanted = {prefix + member: name for name, member in TASKS.items()}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                handle = archive.extractfile(member)
                assert handle is not None
                found[wanted[member.name]] = json.load(handle)
    missing = sorted(set(TASKS) - set(found))
    if missing:
        raise SubFitError(f"{sdist.name} holds no task {', '.join(missing)}")
    out.mkdir()
    for name in TASKS:
        write_jsonl(out / f"{name}.jsonl", mc_rows(found[name], name))
