"""``evaluate`` and ``benchmark`` through typer's CliRunner on an app built with ``cli_eval.register``."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from subfit_onnx.cli_eval import register
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.perplexity import make_windows, window_perplexity


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "toy.jsonl"
    rows = [{"input": f"Question {i}: pick one", "choices": ["yes", "no", "maybe"], "label": i % 3} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def invoke(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_evaluate_json_against_reference(app, tiny_exports, tiny_calibration_text, mc_file):
    res = invoke(app, "evaluate", tiny_exports["gaps"], "--reference", tiny_exports["dense"], "--text",
                 tiny_calibration_text, "--windows", 4, "--window-len", 64, "--tasks", mc_file, "--limit", 5, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    ppl = data["model"]["perplexity"]
    assert (ppl["num_windows"], ppl["window_len"], ppl["scored_tokens"]) == (4, 64, 4 * 63)
    decoder = OnnxDecoder(tiny_exports["dense"])
    expected = window_perplexity(decoder, make_windows(decoder.tokenizer, tiny_calibration_text, 4, 64)).perplexity
    assert ppl["perplexity"] == pytest.approx(expected, rel=1e-9)
    # same weights under renamed KV: every ratio is 1
    assert data["ratios"]["perplexity"] == pytest.approx(1.0, abs=1e-6)
    assert data["model"]["tasks"]["toy"]["n"] == 5
    assert data["model"]["tasks"]["toy"] == data["reference"]["tasks"]["toy"]
    assert data["model"]["kv_layers"] == [0, 2, 3, 7] and data["reference"]["kv_layers"] == [0, 1, 2, 3]


def test_evaluate_table_for_compressed(app, tiny_compressed, tiny_exports, tiny_calibration_text, mc_file):
    res = invoke(app, "evaluate", tiny_compressed, "--reference", tiny_exports["dense"], "--text",
                 tiny_calibration_text, "--windows", 3, "--window-len", 48, "--tasks", mc_file)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "3 windows x 48 tokens" in out and "stride" in out
    assert "perplexity" in out and "toy acc (n=6)" in out and "toy acc_norm" in out and "ratio" in out


@pytest.mark.parametrize("args, message", [
    (["evaluate", "/no/such/export", "--text", "x.txt"], "is not a folder"),
    (["evaluate", "{dense}", "--text", "/no/such.txt"], "evaluation source /no/such.txt does not exist"),
    (["evaluate", "{dense}", "--text", "{text}", "--dataset", "wikitext"], "not both"),
    (["evaluate", "{dense}"], "nothing to evaluate"),
    (["evaluate", "{dense}", "--tasks", "/no/such.jsonl"], "does not exist"),
    (["benchmark", "/no/such/export"], "is not a folder"),
])
def test_errors_are_one_line(app, tiny_exports, tiny_calibration_text, args, message):
    args = [a.format(dense=tiny_exports["dense"], text=tiny_calibration_text) for a in args]
    res = invoke(app, *args)
    assert res.exit_code == 1
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_cuda_without_cuda_is_one_line(app, tiny_exports):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    res = invoke(app, "benchmark", tiny_exports["dense"], "--provider", "cuda")
    assert res.exit_code == 1 and "CUDAExecutionProvider is not available" in res.stderr


def test_benchmark_json_compressed_vs_dense(app, tiny_compressed, tiny_exports):
    res = invoke(app, "benchmark", tiny_compressed, "--reference", tiny_exports["dense"], "--repeats", 2,
                 "--new-tokens", 8, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    cand, ref, ratios = data["candidate"], data["reference"], data["ratios"]
    report = json.loads((tiny_compressed / "subfit_report.json").read_text())
    assert cand["kv_bytes_per_token"] == report["kv_bytes_per_token"]["after"]
    assert ref["kv_bytes_per_token"] == report["kv_bytes_per_token"]["before"]
    assert ratios["kv_bytes_per_token"] == pytest.approx(cand["kv_bytes_per_token"] / ref["kv_bytes_per_token"])
    assert cand["kv_bytes_at_context"] == 2048 * cand["kv_bytes_per_token"]
    assert cand["file_bytes"] == (tiny_compressed / "model.onnx").stat().st_size
    for key in ("prefill_128_ms", "prefill_512_ms", "decode_512_ms_per_token", "generate_tokens_per_s"):
        assert cand["metrics"][key] > 0 and ref["metrics"][key] > 0
        assert ratios[key] == pytest.approx(cand["metrics"][key] / ref["metrics"][key])
    assert len(cand["samples"]["prefill_128_ms"]) == 2  # one per repeat, interleaved with the reference
    assert len(cand["samples"]["decode_512_ms_per_token"]) == 2 * data["settings"]["decode_steps"]


def test_benchmark_table_with_runtimes(app, tiny_exports):
    res = invoke(app, "benchmark", tiny_exports["gaps"], "--reference", tiny_exports["dense"], "--repeats", 1,
                 "--new-tokens", 6, "--runtimes")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "prefill 512 tokens (ms)" in out and "KV cache @2048 (MB)" in out and "(KV layers: 0-3)" in out and "(KV layers: 0,2-3,7)" in out
    for runtime in ("ort-loop", "optimum-default", "optimum-tuned", "genai"):
        assert runtime in out
