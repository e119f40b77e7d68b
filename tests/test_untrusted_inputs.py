"""Untrusted or wrong inputs are refused before any work: external data outside the model's folder, a reference
that is not an export. Each ends as one line and exit code 1 (bad input), never as an internal error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from subfit_onnx.onnx_files import check_external_data, model_file_bytes
from test_cli_errors import assert_user_error, cli, listing


def _with_external_data(export: Path, location: str) -> Path:
    """Re-save ``export`` with its weights in one external file at ``location`` (relative to the folder)."""
    import onnx

    path = export / "model.onnx"
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    target = (export / location).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    (export / "model.onnx_data").rename(target)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return export


@pytest.fixture
def traversing(tmp_path, tiny_export):
    """A tiny export whose weights point at ``../secret.bin``, outside its folder (the file exists there)."""
    export = shutil.copytree(tiny_export("llama"), tmp_path / "export")
    return _with_external_data(export, "../secret.bin")


def test_the_data_file_is_counted_but_never_opened_before_the_check(traversing):
    secret = traversing.parent / "secret.bin"
    assert model_file_bytes(traversing / "model.onnx") == (traversing / "model.onnx").stat().st_size + \
        secret.stat().st_size  # sizes only; reading it is what the check below refuses


def test_a_location_outside_the_folder_is_refused(traversing):
    with pytest.raises(Exception, match=r"outside the model's folder") as info:
        check_external_data(traversing / "model.onnx")
    assert type(info.value).__name__ == "SubFitError"


def test_a_location_inside_the_folder_is_accepted(tmp_path, tiny_export):
    export = _with_external_data(shutil.copytree(tiny_export("llama"), tmp_path / "export"), "weights/all.bin")
    assert check_external_data(export / "model.onnx") == [(export / "weights" / "all.bin").resolve()]


def test_a_missing_data_file_is_named(tmp_path, tiny_export):
    export = _with_external_data(shutil.copytree(tiny_export("llama"), tmp_path / "export"), "model.onnx_data")
    (export / "model.onnx_data").unlink()
    with pytest.raises(Exception, match=r"model.onnx_data, which does not exist"):
        check_external_data(export / "model.onnx")


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_checkpoint, tiny_calibration_text):
    folder = tmp_path_factory.mktemp("plan") / "plan"
    result = cli("calibrate", tiny_checkpoint("llama"), "-s", 0.3, "-c", tiny_calibration_text, "-n", 8, "-l", 32,
                 "-o", folder)
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("command", ["optimize", "calibrate", "rewrite", "inspect"])
def test_every_graph_command_refuses_it_up_front(traversing, tiny_checkpoint, tiny_calibration_text, tmp_path,
                                                 plan, command):
    before = listing(tmp_path)
    args = {
        "optimize": ["--model", tiny_checkpoint("llama"), "-c", tiny_calibration_text, "-n", 8, "-l", 32,
                     "-o", tmp_path / "out"],
        "calibrate": ["--model", tiny_checkpoint("llama"), "-c", tiny_calibration_text, "-n", 8, "-l", 32,
                      "-o", tmp_path / "out"],
        "rewrite": ["--plan", plan, "-o", tmp_path / "out"],
        "inspect": ["--plan", plan],
    }[command]
    start = time.perf_counter()
    result = cli(command, traversing, *args)
    assert_user_error(result, "../secret.bin", "outside the model's folder")
    assert time.perf_counter() - start < 15  # refused before calibration, not after it
    assert listing(tmp_path) == before


def test_onnx_backend_refuses_it_too(traversing, tiny_calibration_text, tmp_path):
    result = cli("optimize", traversing, "--calibration-backend", "onnx", "-c", tiny_calibration_text,
                 "-n", 8, "-l", 32, "-o", tmp_path / "out")
    assert_user_error(result, "outside the model's folder")


def test_evaluate_refuses_an_untrusted_reference_before_evaluating(traversing, tiny_export, tiny_calibration_text):
    result = cli("evaluate", tiny_export("llama"), "--reference", traversing, "--text", tiny_calibration_text,
                 "--windows", 2, "--window-len", 16)
    assert_user_error(result, "outside the model's folder")
    assert "perplexity" not in result.stderr  # no progress bar was started


@pytest.mark.parametrize("command", ["evaluate", "benchmark"])
def test_reference_problems_are_found_before_the_model_runs(tiny_export, tiny_checkpoint, tiny_calibration_text,
                                                           tmp_path, command):
    extra = ["--text", tiny_calibration_text, "--windows", 2, "--window-len", 16] if command == "evaluate" else \
        ["--repeats", 1]
    missing = cli(command, tiny_export("llama"), "--reference", tmp_path / "nowhere", *extra)
    assert_user_error(missing, "nowhere", "is not a folder")
    pytorch = cli(command, tiny_export("llama"), "--reference", tiny_checkpoint("llama"), *extra)
    assert_user_error(pytorch, "is a PyTorch model, not an ONNX export", "subfit-onnx export")
    for result in (missing, pytorch):
        assert "perplexity" not in result.stderr and "benchmark" not in result.stderr
