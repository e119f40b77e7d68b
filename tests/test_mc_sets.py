"""The multiple-choice sets fetch-assets writes: BIG-bench tasks from the bigbench sdist, as JSONL rows.

The real sdist is 360 MB, so the tests build a small one with the same member names; the conversion of the real
one was checked against ../shared/data/mc (byte-identical for both tasks).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from subfit_onnx import mc_sets
from subfit_onnx.errors import SubFitError
from subfit_onnx.evaluation.multiple_choice import load_mc_items

TASK = {"name": "toy", "examples": [
    {"input": "The sky is ", "target_scores": {"green": 0, "blue": 1, "loud": 0}},
    {"input": "Two plus two is", "target_scores": {"four": 1, "five": 0}},
]}


def test_rows_strip_the_answer_space_and_keep_choice_order():
    rows = mc_sets.mc_rows(TASK, "toy")
    assert rows == [{"input": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
                    {"input": "Two plus two is", "choices": ["four", "five"], "label": 0}]


@pytest.mark.parametrize("scores", [{"a": 1, "b": 1}, {"a": 0, "b": 0}, {"a": 1}])
def test_examples_without_exactly_one_answer_are_refused(scores):
    with pytest.raises(SubFitError, match="example 0: expected one choice scored 1"):
        mc_sets.mc_rows({"examples": [{"input": "q", "target_scores": scores}]}, "bad")


def _sdist(folder: Path, tasks: dict[str, dict]) -> Path:
    name, version = mc_sets.BIGBENCH
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for task, member in mc_sets.TASKS.items():
            if task in tasks:
                data = json.dumps(tasks[task]).encode()
                info = tarfile.TarInfo(f"{name}-{version}/{member}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def test_fetch_writes_one_jsonl_per_task_that_evaluation_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(mc_sets, "download_sdist", lambda project, version, dest: _sdist(dest, dict.fromkeys(
        mc_sets.TASKS, TASK)))
    (tmp_path / "scratch").mkdir()
    mc_sets.fetch_mc_sets(tmp_path / "mc", tmp_path / "scratch")
    assert sorted(p.name for p in (tmp_path / "mc").iterdir()) == sorted(f"{t}.jsonl" for t in mc_sets.TASKS)
    items = load_mc_items(tmp_path / "mc" / "social_iqa.jsonl")
    assert [(i.input, i.label) for i in items] == [("The sky is", 1), ("Two plus two is", 0)]


def test_a_missing_task_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mc_sets, "download_sdist", lambda project, version, dest: _sdist(dest, {"social_iqa": TASK}))
    (tmp_path / "scratch").mkdir()
    with pytest.raises(SubFitError, match="holds no task goal_inference"):
        mc_sets.fetch_mc_sets(tmp_path / "mc", tmp_path / "scratch")
    assert not (tmp_path / "mc").exists()
