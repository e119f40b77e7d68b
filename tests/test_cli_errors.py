"""Every user mistake ends as one line on stderr, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from subfit_onnx.cli import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR, app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def error_lines(stderr: str) -> list[str]:
    """What a person sees last on stderr: progress bars redraw with \r, so split on it too."""
    shown = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return [line for line in shown if line.startswith("error")] if shown and shown[-1].startswith("error") else shown


def assert_user_error(result, *needles: str) -> str:
    assert result.exit_code == EXIT_USER_ERROR, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cal(tiny_calibration_text):
    return ["-c", tiny_calibration_text, "-n", 8, "-l", 32]


@pytest.fixture
def workdir(tmp_path, tiny_export):
    """A private copy of the tiny export, so 'nothing written' can be checked on a folder we own."""
    export = shutil.copytree(tiny_export("llama"), tmp_path / "export")
    return tmp_path, export


def _no_kv_export(folder: Path, checkpoint: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), folder, task="text-generation", do_validation=False, local_files_only=True)
    return folder


def _non_decoder_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"], name="add")], "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


def _unsupported_checkpoint(folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_checkpoints import char_tokenizer

    config = AutoConfig.for_model("gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _two_layer_llama(folder: Path) -> Path:
    from tiny_checkpoints import char_tokenizer
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


# ---- inputs ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    assert_user_error(cli("optimize", tmp_path / "nothere" / "model.onnx"), "does not exist")
    assert listing(tmp_path) == set()


def test_file_that_is_not_onnx(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a protobuf")
    assert_user_error(cli("optimize", fake, "-s", 0.25), "is not an ONNX model")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_user_error(cli("optimize", text), "is not an ONNX file")
    assert listing(tmp_path) == {"model.onnx", "notes.txt"}


def test_folder_that_is_neither_export_nor_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("optimize", tmp_path / "empty"), "neither an ONNX export", "nor a model folder")


def test_onnx_that_is_not_a_decoder(tmp_path):
    model = _non_decoder_onnx(tmp_path / "adder" / "model.onnx")
    assert_user_error(cli("optimize", model, "-s", 0.25), "not a decoder LLM", "input_ids")
    assert_user_error(cli("inspect", model), "not a decoder LLM")
    assert listing(tmp_path) == {"adder"}


def test_export_without_kv_cache_is_refused_with_the_remedy(tmp_path, tiny_checkpoint):
    export = _no_kv_export(tmp_path / "nokv", tiny_checkpoint("llama"))
    line = assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama")), "no KV cache")
    assert "text-generation-with-past" in line and "pass the PyTorch model as SOURCE" in line
    assert listing(tmp_path) == {"nokv"}


def test_already_compressed_export_is_refused(tmp_path, tiny_export, tiny_checkpoint, cal):
    out = tmp_path / "once"
    assert cli("optimize", tiny_export("llama"), "-m", tiny_checkpoint("llama"), "-s", 0.3, "-o", out, *cal).exit_code == 0
    assert_user_error(cli("optimize", out, "-m", tiny_checkpoint("llama"), "-o", tmp_path / "twice", *cal),
                      "already compressed by SubFit")
    assert listing(tmp_path) == {"once"}


# ---- settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_sparsity_outside_zero_one(workdir, value, cal):
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "--sparsity", value, *cal), "sparsity must be between 0 and 1")
    assert listing(tmp) == {"export"}


@pytest.mark.parametrize("value,hint", [("25", "did you mean 0.25?"), ("12.5", "did you mean 0.125?")])
def test_sparsity_given_as_a_percentage_gets_a_hint(workdir, value, hint, cal):
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "--sparsity", value, *cal), f"got {value}", hint)
    assert listing(tmp) == {"export"}


def test_sparsity_too_high_for_the_model(workdir, tiny_checkpoint, cal):
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-s", 0.95, *cal),
                      "too high for this model", "the most is 0.917")
    assert listing(tmp) == {"export"}


def test_output_exists_without_overwrite(workdir, tiny_checkpoint, cal):
    tmp, export = workdir
    out = tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-o", out, *cal),
                             "already exists", "pass --overwrite to replace it")
    assert "overwrite=True" not in line  # the API's words stay in the API
    assert listing(out) == {"keep.txt"} and listing(tmp) == {"export", "taken"}


# ---- calibration text -----------------------------------------------------------------------------------------
def test_calibration_source_missing(workdir, tiny_checkpoint):
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-c", tmp / "nope.txt"), "does not exist")
    assert listing(tmp) == {"export"}


def test_calibration_source_empty(workdir, tiny_checkpoint):
    tmp, export = workdir
    (tmp / "empty.txt").write_text("  \n")
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-c", tmp / "empty.txt"), "holds no text")
    assert listing(tmp) == {"export", "empty.txt"}


def test_calibration_source_too_short(workdir, tiny_checkpoint, tiny_calibration_text):
    tmp, export = workdir
    line = assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-c", tiny_calibration_text,
                                 "-n", 64, "-l", 256), "64 x 256 = 16384")
    assert "--num-samples" in line
    assert listing(tmp) == {"export"}


def test_default_calibration_needs_the_hub(workdir, tiny_checkpoint, monkeypatch):
    """The default (WikiText-2 from the hub) fails fast and says what to pass instead when offline."""
    from subfit_onnx import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama")),
                      "wikitext", "needs the Hugging Face Hub", "--calibration")
    assert_user_error(cli("optimize", "some-org/some-model"), "needs the Hugging Face Hub", "local model folder")
    assert listing(tmp) == {"export"}


# ---- checkpoint ----------------------------------------------------------------------------------------------
def test_export_without_model_says_model_is_needed(workdir, cal):
    tmp, export = workdir
    config = json.loads((export / "config.json").read_text())
    config.pop("_name_or_path", None)  # the export names no checkpoint that exists here
    (export / "config.json").write_text(json.dumps(config))
    line = assert_user_error(cli("optimize", export, "--calibration-backend", "torch", *cal), "--model is needed")
    assert "--plan" in line and "--calibration-backend onnx" in line
    assert listing(tmp) == {"export"}


def test_model_that_does_not_match_the_graph(workdir, tiny_checkpoint, cal):
    tmp, export = workdir
    small = _two_layer_llama(tmp.parent / f"{tmp.name}-llama2")
    assert_user_error(cli("optimize", export, "-m", small, *cal), "does not match the ONNX graph", "layers 2 vs 4")
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("qwen2"), *cal), "family qwen2 vs llama")
    assert listing(tmp) == {"export"}


def test_plan_for_another_model(workdir, tiny_checkpoint, cal):
    tmp, export = workdir
    plan = tmp.parent / f"{tmp.name}-gemma-plan"
    assert cli("calibrate", tiny_checkpoint("gemma"), "-s", 0.3, "-o", plan, *cal).exit_code == 0
    assert_user_error(cli("rewrite", export, "--plan", plan, "-o", tmp / "out"), "does not match the ONNX graph")
    assert_user_error(cli("rewrite", export, "--plan", tmp / "no-plan"), "no SubFit plan")
    assert listing(tmp) == {"export"}


@pytest.mark.parametrize("kind", ["checkpoint", "export"])
def test_unsupported_family(tmp_path, kind, cal):
    checkpoint = _unsupported_checkpoint(tmp_path / "neox")
    source = checkpoint
    if kind == "export":
        from optimum.exporters.onnx import main_export

        source = tmp_path / "neox-onnx"
        main_export(str(checkpoint), source, task="text-generation-with-past", do_validation=False,
                    local_files_only=True)
    assert_user_error(cli("optimize", source, "-m", checkpoint, "-s", 0.25, *cal), "'gpt_neox' is not supported",
                      "llama")
    assert not [p for p in tmp_path.iterdir() if "subfit" in p.name or p.name.startswith(".")]


# ---- the machine ----------------------------------------------------------------------------------------------
def test_no_space_left_on_device(workdir, tiny_checkpoint, cal, monkeypatch):
    import safetensors.numpy

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    tmp, export = workdir
    assert_user_error(cli("optimize", export, "-m", tiny_checkpoint("llama"), "-o", tmp / "out", *cal),
                      "no space left on the device", str(tmp / "out"))
    assert listing(tmp) == {"export"}  # neither OUT nor the staging folder


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(workdir, monkeypatch):
    from subfit_onnx import api

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "optimize", boom)
    _, export = workdir
    result = cli("optimize", export)
    assert result.exit_code == EXIT_INTERNAL_ERROR
    assert error_lines(result.stderr) == [
        "error: internal error (RuntimeError: boom); rerun with --debug for the traceback"]
    debug = cli("optimize", export, "--debug")
    assert debug.exit_code == EXIT_INTERNAL_ERROR and "Traceback" in debug.stderr


def test_user_error_with_debug_shows_the_traceback(workdir):
    _, export = workdir
    result = cli("optimize", export, "-s", 2, "--debug")
    assert result.exit_code == EXIT_USER_ERROR and "Traceback" in result.stderr
    assert error_lines(result.stderr)[-1].startswith("error: sparsity")


def test_interrupt_writes_nothing(workdir, tiny_checkpoint, cal, monkeypatch):
    from subfit_onnx.exporters import rewrite

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rewrite, "rewrite_into", interrupted)
    tmp, export = workdir
    result = cli("optimize", export, "-m", tiny_checkpoint("llama"), "-o", tmp / "out", *cal)
    assert result.exit_code == EXIT_INTERRUPTED and "interrupted" in result.stderr
    assert listing(tmp) == {"export"}
