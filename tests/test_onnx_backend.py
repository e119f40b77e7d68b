"""The ONNX Runtime calibration backend against the PyTorch one, on tiny exports of every family.

Tolerance: with the same tokens and config, both backends must remove the same units, and every bypass matrix
(W, or down @ up) and bias must agree within a relative Frobenius error of 1e-3 in fp32 (measured: below 6e-6,
5e-5 for GPT-2). That comparison accumulates the per-batch statistics in float64 (``UnitStats.product_dtype``)
so it measures the two graphs' numerics and nothing else: with the default float32 products, rounding is
amplified by the tiny models' ill-conditioned fits (GPT-2: 9e-3; every other family below 1.1e-4; SmolLM2 at
64 x 256 tokens: 3.5e-4, see ``benchmarks/results/onnx_backend.json``), which ``test_default_products`` bounds.
The reference for Gemma-2 runs PyTorch's sdpa attention, which is what Optimum exports (it drops the
attention-logit soft-capping that eager applies, a 1.2e-3 logit gap); against eager the selection must still
agree and the weights within 1e-2. An fp16 export must select the same units as fp32 PyTorch with weights within
2e-2 (measured: 4e-3).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from progress_recorder import Recorder
from rewrite_helpers import random_bypass
from subfit_onnx.calibration import runner
from subfit_onnx.calibration.calibrate import calibrate_model, run_calibration
from subfit_onnx.calibration.onnx_backend import OrtLayerRunner, calibrate_export
from subfit_onnx.calibration.onnx_cut import GraphCutter
from subfit_onnx.calibration.onnx_session import CPU, CUDA, SessionFactory, default_providers, prefill_inputs
from subfit_onnx.calibration.stats import UnitStats
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.errors import SubFitError
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure
from tiny_models import FAMILY_CONFIGS, tiny_model

TOKENS = np.random.default_rng(0).integers(3, 256, size=(8, 32))
FP32_TOL = 1e-3
# linear FFN bypasses, so every family compares the same fits (bypasses with neurons: ``test_onnx_neurons``)
CONFIG = SubFitConfig(sparsity=0.7, num_samples=8, seq_len=32, batch_size=4, attention_rank=Portion(count=8),
                      ffn_bypass="linear")


def torch_reference(family: str):
    model = tiny_model(family)
    if family == "gemma2":
        model.set_attn_implementation("sdpa")  # the attention Optimum exports (no soft-capping)
    return model


def matrix(tensors: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    if f"{key}.weight" in tensors:
        return tensors[f"{key}.weight"]
    if f"{key}.down" in tensors:
        return tensors[f"{key}.down"] @ tensors[f"{key}.up"]
    return None


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def worst_errors(result, reference) -> tuple[float, float]:
    """Largest relative error of the bypass matrices and of the biases over the removed units."""
    w_err = b_err = 0.0
    for unit in reference.plan.removed:
        w_ref, w = matrix(reference.tensors, unit.key), matrix(result.tensors, unit.key)
        if w_ref is not None:
            w_err = max(w_err, rel(w, w_ref))
        b_err = max(b_err, rel(result.tensors[f"{unit.key}.bias"], reference.tensors[f"{unit.key}.bias"]))
    return w_err, b_err


def removed(result) -> list[str]:
    return [u.key for u in result.plan.removed]


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def both_backends(request, tiny_export):
    """Both backends with float64 per-batch products, so only the graphs' numerics differ."""
    family = request.param
    export = tiny_export(family)
    exact = functools.partial(UnitStats, product_dtype=np.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "UnitStats", exact)  # both backends make their statistics through RowBatches.new_stats
        return (family, export, calibrate_export(export, TOKENS, CONFIG),
                calibrate_model(torch_reference(family), TOKENS, CONFIG))


def test_same_selection_and_weights_as_pytorch(both_backends):
    family, _, onnx_result, torch_result = both_backends
    assert removed(onnx_result) == removed(torch_result)
    kinds = {u.kind for u in torch_result.plan.removed}
    assert kinds == {"attention", "mlp"}, f"{family}: the config should remove both kinds, got {kinds}"
    w_err, b_err = worst_errors(onnx_result, torch_result)
    assert w_err < FP32_TOL and b_err < FP32_TOL, (family, w_err, b_err)
    for mine, theirs in zip(onnx_result.plan.removed, torch_result.plan.removed):
        assert mine.bypass.form == theirs.bypass.form and mine.bypass.rank == theirs.bypass.rank
        assert mine.score == pytest.approx(theirs.score, rel=1e-2)


def test_plans_are_interchangeable(both_backends):
    """Identity, unit parameter counts and sparsity bookkeeping equal the PyTorch backend's."""
    _, export, onnx_result, torch_result = both_backends
    skip = {"name_or_path"}
    assert onnx_result.plan.model.model_dump(exclude=skip) == torch_result.plan.model.model_dump(exclude=skip)
    assert onnx_result.plan.sparsity == torch_result.plan.sparsity
    assert onnx_result.plan.calibration["backend"] == "onnx"
    assert torch_result.plan.calibration["backend"] == "torch"
    assert onnx_result.plan.calibration["export"] == str(export / "model.onnx")
    assert all(t.dtype == np.float32 for t in onnx_result.tensors.values())


def test_default_products(tiny_export):
    """The default float32 per-batch products: GPT-2, the worst-conditioned tiny fit, still selects alike."""
    onnx_result = calibrate_export(tiny_export("gpt2"), TOKENS, CONFIG)
    torch_result = calibrate_model(tiny_model("gpt2"), TOKENS, CONFIG)
    assert removed(onnx_result) == removed(torch_result)
    w_err, b_err = worst_errors(onnx_result, torch_result)
    assert w_err < 2e-2 and b_err < 1e-2, (w_err, b_err)


def test_gemma2_against_eager_pytorch(tiny_export):
    """Eager Gemma-2 soft-caps attention logits and the export does not: the selection still agrees."""
    onnx_result = calibrate_export(tiny_export("gemma2"), TOKENS, CONFIG)
    eager = calibrate_model(tiny_model("gemma2"), TOKENS, CONFIG)
    assert removed(onnx_result) == removed(eager)
    w_err, b_err = worst_errors(onnx_result, eager)
    assert 1e-5 < w_err < 1e-2 and b_err < 1e-2, (w_err, b_err)


@pytest.mark.parametrize("score", ["end_to_end", "stream_error"])
def test_fp16_export_selects_like_fp32(tiny_export, score):
    """end_to_end probes layer 0 with a bypass of the norm the fp16 export applies before widening the stream,
    a value only the prelude computes: the prelude is renewed to compute it."""
    config = SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=4, attention_rank=Portion(count=8),
                          score=score, ffn_bypass="linear")
    half = calibrate_export(tiny_export("llama", "fp16"), TOKENS, config)
    full = calibrate_model(tiny_model("llama"), TOKENS, config)
    assert removed(half) == removed(full)
    w_err, b_err = worst_errors(half, full)
    assert 1e-4 < w_err < 2e-2 and b_err < 2e-2, (w_err, b_err)  # fp16 numerics, not exact
    assert all(t.dtype == np.float32 for t in half.tensors.values())


def test_dense_stream_target_agrees(tiny_export):
    config = CONFIG.model_copy(update={"target": "dense_stream"})
    onnx_result = calibrate_export(tiny_export("llama"), TOKENS, config)
    torch_result = calibrate_model(tiny_model("llama"), TOKENS, config)
    assert removed(onnx_result) == removed(torch_result)
    w_err, b_err = worst_errors(onnx_result, torch_result)
    assert w_err < FP32_TOL and b_err < FP32_TOL


def test_external_data_export_gives_the_same_plan(tiny_export, tmp_path):
    src = tiny_export("qwen2")
    out = tmp_path / "external"
    out.mkdir()
    for item in src.iterdir():
        if item.suffix not in (".onnx", ".onnx_data"):
            shutil.copy(item, out / item.name)
    ir.save(ir.load(src / "model.onnx"), out / "model.onnx", external_data="model.onnx_data", size_threshold_bytes=1024)
    assert (out / "model.onnx_data").stat().st_size > (out / "model.onnx").stat().st_size
    inline = calibrate_export(src, TOKENS, CONFIG)
    external = calibrate_export(out, TOKENS, CONFIG)
    assert removed(inline) == removed(external)
    for key, value in inline.tensors.items():
        np.testing.assert_allclose(external.tensors[key], value, rtol=1e-6, atol=1e-7)


def test_the_users_export_is_only_read(tiny_export):
    export = tiny_export("llama")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in export.iterdir()}
    calibrate_export(export, TOKENS, CONFIG)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in export.iterdir()}
    assert after == before


def _graph_run(model: ir.Model, tokens: np.ndarray, extra_output: str) -> np.ndarray:
    """The full graph on ``tokens`` with an empty past; returns the value ``extra_output``."""
    values = ir.convenience.create_value_mapping(model.graph)
    model.graph.outputs.append(values[extra_output])
    session = SessionFactory.create(Path("."), [CPU]).session(model)
    structure = find_decoder_structure(model)
    feed = prefill_inputs(list(model.graph.inputs), *tokens.shape, structure.num_kv_heads, structure.head_dim)
    feed["input_ids"] = tokens
    return session.run([extra_output], {i.name: feed[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "phi3"])
def test_layer_cuts_chain_to_the_full_graph(tiny_export, family):
    """Prelude + layer graphs, fed through the activation store, give the full graph's last stream exactly."""
    export = tiny_export(family)
    runner = OrtLayerRunner(export, TOKENS[:4], batch_size=2)
    try:
        for i in range(runner.num_layers):
            runner.sweep(i, (), "stream", "")
            runner.store.advance()
        last = runner.cutter.boundaries[-1].name
        expected = _graph_run(ir.load(export / "model.onnx"), TOKENS[:4], last)
        np.testing.assert_allclose(np.asarray(runner.store.current), expected, rtol=1e-5, atol=1e-5)
        if family == "gemma3":
            assert "position_ids" not in {v.name for v in runner.model.graph.inputs}
    finally:
        runner.close()


def test_installed_bypasses_are_the_rewritten_graph_and_undo_restores(tiny_export):
    """What later layers see after install_bypass is what the rewritten export computes; undo gives back dense."""
    export = tiny_export("llama")
    rng = np.random.default_rng(3)
    bypasses = {(1, "mlp"): random_bypass(64, "full", rng), (2, "attention"): random_bypass(64, "lowrank", rng)}
    runner = OrtLayerRunner(export, TOKENS[:4], batch_size=2)
    last = runner.cutter.boundaries[-1].name

    def final_stream() -> np.ndarray:
        runner.store.restore()
        for i in range(runner.num_layers):
            runner.sweep(i, (), "stream", "")
            runner.store.advance()
        return np.asarray(runner.store.current).copy()

    try:
        dense = final_stream()
        swaps = [runner.install_bypass(layer, kind, b) for (layer, kind), b in bypasses.items()]
        compressed = final_stream()
        rewritten = ir.load(export / "model.onnx")
        SubFitRewritePass(find_decoder_structure(rewritten), bypasses)(rewritten)
        np.testing.assert_allclose(compressed, _graph_run(rewritten, TOKENS[:4], last), rtol=1e-5, atol=1e-5)
        assert rel(compressed, dense) > 1e-2
        for swap in reversed(swaps):
            swap.undo()
        assert not any(u.bypassed for u in runner.structure.units())
        np.testing.assert_array_equal(final_stream(), dense)
    finally:
        runner.close()


def test_shared_values_are_found_by_dependence(tiny_export):
    """Layers >= 1 read RoPE from layer 0's scope and the mask from the prelude; only B_i is stream data."""
    model = ir.load(tiny_export("llama") / "model.onnx")
    ShapeInferencePass(strict_mode=False)(model)  # the runner does this once: cut graphs declare their types
    cutter = GraphCutter(model, find_decoder_structure(model, "llama"))
    prelude = cutter.prelude()
    assert any(name.startswith("/model/layers.0/self_attn/") for name in prelude.shared)
    assert "input_ids" in prelude.inputs
    assert len(prelude.model.graph) < len(model.graph) / 4  # it does not drag layers in
    for i in range(1, cutter.num_layers):
        shared = {v.name for v in cutter.shared_values(i)}
        assert {f"past_key_values.{i}.key", f"past_key_values.{i}.value"} <= shared
        assert not any(v in cutter.tags.data for v in cutter.shared_values(i))
    assert not cutter.depends_on_token_values(prelude.shared)


def test_auto_weighting_checks_alike_in_both_backends(tiny_export):
    """Pass 2 runs once per candidate weighting, the held-out rows inside its batches but outside its statistics."""
    config = CONFIG.model_copy(update={"weighting": "auto", "sparsity": 0.3, "num_samples": 16})
    tokens = np.random.default_rng(5).integers(3, 256, size=(16, 32))  # the check needs 16 rows (2 held out)
    progress = Recorder()
    onnx_plan = calibrate_export(tiny_export("llama"), tokens, config, progress=progress).plan
    torch_plan = calibrate_model(tiny_model("llama"), tokens, config).plan
    for w in ("stream", "uniform"):  # each candidate's pass 2 reached the last layer
        assert any(d.startswith("fitting layer 4/4") and d.endswith(f"({w}-weighted)") for d in progress.bars)
    assert onnx_plan.calibration["weighting"] == torch_plan.calibration["weighting"]
    for w, distance in torch_plan.calibration["held_out_distance"].items():
        assert onnx_plan.calibration["held_out_distance"][w] == pytest.approx(distance, rel=1e-3, abs=1e-7)
    assert [u.key for u in onnx_plan.removed] == [u.key for u in torch_plan.removed]


def test_end_to_end_probes_alike_in_both_backends(tiny_export):
    """score="end_to_end": each unit alone, run from its layer on in ONNX Runtime, moves the last stream as in
    PyTorch; the probes report through one bar, not one per layer and unit."""
    config = CONFIG.model_copy(update={"weighting": "auto", "sparsity": 0.3, "num_samples": 16, "score": "end_to_end"})
    tokens = np.random.default_rng(5).integers(3, 256, size=(16, 32))
    progress = Recorder()
    onnx_result = calibrate_export(tiny_export("llama"), tokens, config, progress=progress)
    torch_result = calibrate_model(tiny_model("llama"), tokens, config)
    # 8 units, probed together through the 4 layers once: one bar, one step per layer
    assert progress.bars["end-to-end probes (layers)"] == [4, 4] and "" not in progress.bars
    distances = torch_result.dense.end_to_end
    assert len(distances) == 8
    for key, d in distances.items():
        assert onnx_result.dense.end_to_end[key] == pytest.approx(d, rel=1e-3, abs=1e-7)
    assert [u.key for u in onnx_result.plan.removed] == [u.key for u in torch_result.plan.removed]


def test_the_prelude_is_built_once_when_shared_values_are_shapes_only(tiny_export, monkeypatch):
    """The probes and held-out rows run odd row counts (1 to ``batch_size``); the shape-only shared values (RoPE,
    masks) for each are computed from the one prelude, not from a new one per size: its session holds the
    embedding table, and building it again per size took 40 s of a Gemma-3-270m calibration. The values given to
    a 1-row sweep are those of the first row of a full batch."""
    import subfit_onnx.calibration.onnx_backend as backend

    built: list[object] = []
    real = backend._Prelude.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(backend._Prelude, "__init__", counting)
    config = CONFIG.model_copy(update={"sparsity": 0.3, "score": "end_to_end"})
    runner = OrtLayerRunner(tiny_export("llama"), TOKENS, CONFIG.batch_size)
    try:
        assert len(built) == 1 and runner._prelude is None  # the embedding table is let go
        assert sorted(runner._shared) == [1, 2, 3, 4]
        batched = [name for name, value in runner._shared[4].items() if value.ndim and value.shape[0] == 4]
        assert batched  # the mask, at least: there is something to compare
        for name in batched:
            np.testing.assert_array_equal(runner._shared[1][name], runner._shared[4][name][:1])
        run_calibration(runner, config)  # one-row probes, batches of 4
        assert len(built) == 1
    finally:
        runner.close()


def test_progress_goes_through_the_factory(tiny_export, capfd):
    progress = Recorder()
    calibrate_export(tiny_export("llama"), TOKENS, CONFIG, progress=progress)
    descs = list(progress.bars)
    assert descs[0] == "embedding calibration tokens"
    assert "scoring layer 4/4" in descs
    assert "fitting layer 1/4 (attention)" in descs and "fitting layer 1/4 (FFN)" in descs  # pass 2 in halves
    rows = {desc: total for desc, (_, total) in progress.bars.items()}
    assert all(total == CONFIG.prior_rows(TOKENS.shape[0]) for desc, total in rows.items() if desc.startswith("scoring"))
    assert all(total == TOKENS.shape[0] for desc, total in rows.items()
               if not desc.startswith(("scoring", "end-to-end probes")))
    assert rows["end-to-end probes (layers)"] == 4  # counted in layers: the probes run through them together
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_backend_does_not_import_torch(tiny_export):
    code = (
        "import sys, numpy as np\n"
        "from subfit_onnx.calibration.onnx_backend import calibrate_export\n"
        "from subfit_onnx.config import SubFitConfig\n"
        f"r = calibrate_export({str(tiny_export('llama'))!r}, np.random.default_rng(0).integers(3, 256, (4, 16)),\n"
        "                      SubFitConfig(sparsity=0.3, num_samples=4, seq_len=16))\n"
        "assert r.plan.removed\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cuda_provider_is_preferred_when_present(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert default_providers() == [CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert default_providers() == [CPU]
    with pytest.raises(SubFitError, match="lacks CUDAExecutionProvider"):
        SessionFactory.create(Path("."), [CUDA])


def test_bad_inputs_are_refused(tiny_export, tmp_path):
    export = tiny_export("llama")
    with pytest.raises(SubFitError, match="no ONNX model"):
        calibrate_export(tmp_path / "nowhere", TOKENS, CONFIG)
    with pytest.raises(SubFitError, match=r"must lie in \[0, 256\)"):
        calibrate_export(export, TOKENS + 256, CONFIG)
    with pytest.raises(SubFitError, match="integer array"):
        calibrate_export(export, TOKENS.astype(np.float32), CONFIG)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(export / "model.onnx", bare / "model.onnx")
    with pytest.raises(SubFitError, match="no config.json"):
        calibrate_export(bare, TOKENS, CONFIG)
    with pytest.raises(SubFitError, match="sparsity"):
        calibrate_export(export, TOKENS, CONFIG.model_copy(update={"sparsity": 0.99}))


def test_an_already_compressed_export_is_refused(tiny_export, tmp_path):
    export = tiny_export("llama")
    out = tmp_path / "compressed"
    shutil.copytree(export, out)
    model = ir.load(export / "model.onnx")
    bypass = {(1, "mlp"): random_bypass(64, "full", np.random.default_rng(0))}
    SubFitRewritePass(find_decoder_structure(model), bypass)(model)
    ir.save(model, out / "model.onnx")
    with pytest.raises(SubFitError, match="already compressed"):
        calibrate_export(out, TOKENS, CONFIG)


# ---- the public API and CLI: an export alone is enough ------------------------------------------------------------
def _export_naming_no_checkpoint(tiny_export, tmp_path: Path) -> Path:
    """A copy of the tiny export whose config.json names no checkpoint (what a user downloads)."""
    import json

    export = shutil.copytree(tiny_export("llama"), tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    config.pop("_name_or_path", None)
    (export / "config.json").write_text(json.dumps(config))
    return export


def test_optimize_an_export_alone_uses_the_onnx_backend(tiny_export, tiny_checkpoint, tiny_calibration_text, tmp_path):
    import subfit_onnx
    from rewrite_helpers import ort_prefill_decode

    export = _export_naming_no_checkpoint(tiny_export, tmp_path)
    config = SubFitConfig(sparsity=0.5, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32)
    result = subfit_onnx.optimize(export / "model.onnx", config=config, output=tmp_path / "out")
    cal = result.report["plan"]["calibration"]
    assert cal["backend"] == "onnx" and "checkpoint" not in cal and cal["export"].endswith("model.onnx")
    assert result.report["model"]["checkpoint"] is None
    assert result.plan.removed and result.plan.sparsity.achieved >= 0.5
    logits, _, _ = ort_prefill_decode(result.model_path, TOKENS[:1, :8], TOKENS[:1, 8:9])
    assert np.isfinite(logits).all()
    # The same text through the PyTorch backend gives the same plan.
    torch_plan = subfit_onnx.calibrate(export, config=config, model=tiny_checkpoint("llama"),
                                       calibration_backend="torch").plan
    assert [u.key for u in torch_plan.removed] == [u.key for u in result.plan.removed]


def test_cli_calibration_backend_flag(tiny_export, tiny_calibration_text, tmp_path):
    import json

    from typer.testing import CliRunner

    from subfit_onnx.cli import app

    export = _export_naming_no_checkpoint(tiny_export, tmp_path)
    args = ["calibrate", str(export), "-s", "0.5", "-c", str(tiny_calibration_text), "-n", "8", "-l", "32", "--json"]
    done = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "plan"), "--calibration-backend", "onnx"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["calibration"]["backend"] == "onnx"
    refused = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "plan2"), "--calibration-backend", "torch"])
    assert refused.exit_code == 1 and "--model is needed" in refused.stderr


# ---- SmolLM2: the ONNX backend's model is as good as the PyTorch backend's -----------------------------------------
REAL_SAMPLES, REAL_SEQ, REAL_WINDOWS = 32, 256, 16
MAX_RATIO_GAP = 0.02  # |ratio_onnx / ratio_torch - 1|; measured 0.0000 at 64 x 256 (benchmarks/onnx_backend.py)


def _real_config(assets) -> SubFitConfig:
    """The default method (FFN bypasses under ``auto``, which both backends read neurons for)."""
    return SubFitConfig(sparsity=0.25, num_samples=REAL_SAMPLES, seq_len=REAL_SEQ, calibration=str(assets.c4_calibration))


@pytest.fixture(scope="module")
def wiki_windows(smollm2_assets, smollm2_onnx):
    from subfit_onnx.evaluation.decoder import OnnxDecoder
    from subfit_onnx.evaluation.perplexity import make_windows

    return make_windows(OnnxDecoder(smollm2_onnx).tokenizer, smollm2_assets.wiki, REAL_WINDOWS, REAL_SEQ)


def _ppl(folder: Path, windows) -> float:
    from subfit_onnx.evaluation.decoder import OnnxDecoder
    from subfit_onnx.evaluation.perplexity import window_perplexity

    return window_perplexity(OnnxDecoder(folder), windows).perplexity


@pytest.fixture(scope="module")
def onnx_fp32_run(smollm2_assets, smollm2_onnx, wiki_windows, tmp_path_factory):
    """``optimize model.onnx --sparsity 0.25`` with no checkpoint (the ONNX backend) and its wiki ppl ratio."""
    import subfit_onnx

    out = tmp_path_factory.mktemp("smollm2-onnx-backend") / "fp32"
    result = subfit_onnx.optimize(smollm2_onnx / "model.onnx", config=_real_config(smollm2_assets), output=out,
                                  calibration_backend="onnx")
    return result, _ppl(out, wiki_windows) / _ppl(smollm2_onnx, wiki_windows)


def _torch_plan(assets):
    """The PyTorch plan at the same settings (not the session's ``smollm2_subfit25``: other calibration windows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_onnx.calibration.text import calibration_tokens

    config = _real_config(assets)
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(assets.model), assets.c4_calibration,
                                REAL_SAMPLES, REAL_SEQ)
    model = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32, attn_implementation="sdpa")
    result = calibrate_model(model.eval(), tokens, config)
    return result.plan, result.tensors


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_onnx_backend_perplexity_matches_torch(smollm2_assets, smollm2_onnx, wiki_windows, onnx_fp32_run,
                                                       tmp_path):
    import subfit_onnx

    result, onnx_ratio = onnx_fp32_run
    assert result.report["plan"]["calibration"]["backend"] == "onnx"
    plan, tensors = _torch_plan(smollm2_assets)
    assert plan.calibration["backend"] == "torch"
    subfit_onnx.rewrite(smollm2_onnx, (plan, tensors), tmp_path / "torch")
    torch_ratio = _ppl(tmp_path / "torch", wiki_windows) / _ppl(smollm2_onnx, wiki_windows)
    maps = f"onnx {result.plan.depth_map()} vs torch {plan.depth_map()}"
    assert 1.0 < torch_ratio < 3.0, (torch_ratio, maps)
    assert abs(onnx_ratio / torch_ratio - 1) < MAX_RATIO_GAP, (onnx_ratio, torch_ratio, maps)
    differ = {u.key for u in result.plan.removed} ^ {u.key for u in plan.removed}
    assert len(differ) <= 2, maps
    forms = {u.key: u.bypass.form for u in plan.removed}
    assert all(forms[u.key] == u.bypass.form for u in result.plan.removed if u.key in forms), maps


@pytest.fixture(scope="module")
def smollm2_onnx_fp16(smollm2_assets):
    """The fp16 Optimum export of SmolLM2, cached at ``<assets>/onnx/smollm2-fp16`` (Optimum exports fp16 on CPU)."""
    from subfit_onnx.exporters.optimum_export import export_decoder

    folder = smollm2_assets.root / "onnx" / "smollm2-fp16"
    if not (folder / "model.onnx").is_file():
        try:
            export_decoder(smollm2_assets.model, folder, dtype="fp16")
        except (SubFitError, OSError):
            if not (folder / "model.onnx").is_file():  # another session may have finished it meanwhile
                raise
    return folder


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_fp16_export_keeps_the_fp32_ratio(smollm2_assets, smollm2_onnx_fp16, wiki_windows, onnx_fp32_run,
                                                  tmp_path):
    """Calibrated on the fp16 graph itself (fp16 bypasses in the fp16 stream), scored against the fp16 dense."""
    import subfit_onnx

    half = ir.load(smollm2_onnx_fp16 / "model.onnx")
    assert find_decoder_structure(half).dtype == ir.DataType.FLOAT16
    del half
    result = subfit_onnx.optimize(smollm2_onnx_fp16, config=_real_config(smollm2_assets), output=tmp_path / "fp16",
                                  calibration_backend="onnx")
    fp16_ratio = _ppl(tmp_path / "fp16", wiki_windows) / _ppl(smollm2_onnx_fp16, wiki_windows)
    fp32_result, fp32_ratio = onnx_fp32_run
    assert abs(fp16_ratio / fp32_ratio - 1) < MAX_RATIO_GAP, (fp16_ratio, fp32_ratio)
    assert result.plan.depth_map() == fp32_result.plan.depth_map()
