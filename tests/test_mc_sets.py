"""The multiple-choice sets fetch-assets writes: two BIG-bench tasks shipped with the package as gzipped JSONL.

The shipped bytes are those the bigbench 1.0.0 sdist's conversion wrote (checked against ../shared/data/mc, which
holds the same conversion, when this checkout has it).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from subfit_onnx import mc_sets
from subfit_onnx.assets import AssetPaths
from subfit_onnx.errors import SubFitError
from subfit_onnx.evaluation.multiple_choice import load_mc_items

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mc"


def test_fetch_writes_one_jsonl_per_task_that_evaluation_reads(tmp_path):
    mc_sets.fetch_mc_sets(tmp_path / "mc", tmp_path)
    paths = AssetPaths(tmp_path)
    assert [p.name for p in paths.mc_tasks()] == ["social_iqa.jsonl", "goal_inference.jsonl"]
    counts = {p.stem: len(load_mc_items(p)) for p in paths.mc_tasks()}
    assert counts == {"social_iqa": 1954, "goal_inference": 1703}
    first = load_mc_items(paths.mc / "social_iqa.jsonl")[0]
    assert first.input.startswith("Tracy didn't go home that evening") and not first.input.endswith(" ")
    assert (len(first.choices), first.label) == (3, 2)


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data/mc beside this checkout")
def test_shipped_sets_equal_the_shared_conversion():
    for task in mc_sets.TASKS:
        assert mc_sets.mc_set_bytes(task) == (SHARED / f"{task}.jsonl").read_bytes()


def test_a_changed_set_is_one_error(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    (folder / "mc_data").mkdir(parents=True)
    (folder / "mc_data" / "social_iqa.jsonl.gz").write_bytes(gzip.compress(b'{"input": "q"}\n'))
    monkeypatch.setattr(mc_sets.resources, "files", lambda package: folder)
    with pytest.raises(SubFitError, match="social_iqa does not match its sha256"):
        mc_sets.fetch_mc_sets(tmp_path / "mc", tmp_path)
    assert not (tmp_path / "mc").exists()
