"""FFN bypasses that keep some of the FFN's own neurons (``ffn_bypass``): the neurons as numpy, the closed-form
fit, calibration with them, the plan files and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.fitting import fit_bypass
from subfit_onnx.calibration.linalg import NUMPY_LINALG as NUMPY
from subfit_onnx.calibration.neuron_fit import (
    NeuronEnergy,
    StoredRows,
    choose_features,
    feature_stats,
    fit_neurons,
)
from subfit_onnx.calibration.stats import UnitStats
from subfit_onnx.calibration.torch_backend import TorchLayerRunner
from subfit_onnx.cli import app
from subfit_onnx.config import SubFitConfig, make_config
from subfit_onnx.errors import SubFitError
from subfit_onnx.gated_ffn import equal_cost_shape
from subfit_onnx.names import unit_key
from subfit_onnx.plan import CalibratedPlan, load_plan
from subfit_onnx.reference import apply_plan
from subfit_onnx.torch_model import decoder_layers, gated_ffn, model_family, unit_module
from tiny_models import VOCAB, tiny_model

GATED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")
CALIBRATION = np.random.default_rng(3).integers(3, VOCAB, (16, 32))


def ffn_module(model, layer: int):
    family = model_family(model)
    return unit_module(decoder_layers(model, family)[layer], family, "mlp")


@pytest.mark.parametrize("family", GATED)
def test_neurons_in_numpy_are_the_ffn(family):
    """The gate/up weights, the activation and the down rows' weights reproduce the transformers FFN."""
    model = tiny_model(family)
    ffn, mlp = gated_ffn(model, 1), ffn_module(model, 1)
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mlp(x).double().numpy()
    down = mlp.down_proj.weight.detach().double().numpy()
    got = ffn.activations(x.double().numpy()) @ down.T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(ffn.out_weight, (down ** 2).sum(0), rtol=1e-6)


def test_gpt2_ffn_is_not_gated():
    assert gated_ffn(tiny_model("gpt2"), 0) is None


def stored_rows(model, layer: int, rows: int = 6, seq: int = 16, seed: int = 0) -> tuple[StoredRows, UnitStats]:
    """An FFN's inputs, a stream and the layer's outputs as pass 2 stores them, and its linear statistics."""
    rng = np.random.default_rng(seed)
    d = model.config.hidden_size
    x = rng.standard_normal((rows, seq, d)).astype(np.float32)
    mid = (5 * rng.standard_normal((rows, seq, d))).astype(np.float32)
    with torch.no_grad():
        y = ffn_module(model, layer)(torch.as_tensor(x)).numpy()
    linear = UnitStats(d, d, "uniform", np.float64)
    linear.update(x, y, mid)
    return StoredRows(x, mid, mid + y, [slice(0, 3), slice(3, rows)]), linear


def energy_of(rows: StoredRows, ffn, weighting: str = "uniform") -> np.ndarray:
    """The neurons' energies recomputed from stored rows, batch by batch as the sweep sees them."""
    energy = NeuronEnergy(weighting)
    for x, mid, y in rows.parts():
        out = (mid + y).astype(np.float64)
        energy.add(ffn.activations(x.reshape(-1, x.shape[-1]).astype(np.float64)), (out * out).sum(-1))
    return energy.of(ffn)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_the_sweep_taps_the_neurons_energies_from_the_ffn_as_it_runs(family):
    """What the FFN's down projection receives, weighted by the stream after the layer, equals the energies
    recomputed from the stored inputs (Phi-3: fused gate and up; stream weighting: weights differ per token)."""
    model = tiny_model(family)
    runner = TorchLayerRunner(model, CALIBRATION, batch_size=4)
    try:
        tapped = NeuronEnergy("stream")
        runner.sweep(1, ("mlp",), "stream", "", neurons=tapped)
        mid, x = (np.array(a) for a in runner.store.mlp_inputs())
        rows = StoredRows(x, mid, np.array(runner.store.next), list(runner.batches()))
    finally:
        runner.close()
    ffn = gated_ffn(model, 1)
    want = energy_of(rows, ffn, "stream")
    np.testing.assert_allclose(tapped.of(ffn), want, rtol=1e-4, atol=1e-6 * want.max())
    assert want.max() > 10 * want.min()  # the energies differ: the ranking means something


def test_every_neuron_and_every_direction_refit_the_ffn_exactly():
    """With all d_ff neurons and a full basis the FFN is in the bypass's span: the fit must leave ~nothing."""
    model = tiny_model("llama")
    rows, linear = stored_rows(model, 2)
    ffn = gated_ffn(model, 2)
    d, d_ff = ffn.gate.shape
    features = choose_features(linear, energy_of(rows, ffn), ffn, d, d_ff)
    bypass, err = fit_neurons(features, feature_stats(features, rows, linear, NUMPY), 1e-9, NUMPY)
    assert err / linear.y_energy < 1e-5
    got = bypass.apply(rows.x.reshape(-1, d))
    want = (rows.out - rows.mid).reshape(-1, d)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_kept_neurons_are_those_with_the_most_output_energy():
    model = tiny_model("gemma3")
    rows, linear = stored_rows(model, 1)
    ffn = gated_ffn(model, 1)
    a = ffn.activations(rows.x.reshape(-1, rows.x.shape[-1]).astype(np.float64))
    energy = (a ** 2).sum(0) * ffn.out_weight
    features = choose_features(linear, energy_of(rows, ffn), ffn, 4, 10)
    assert list(features.kept) == list(np.argsort(energy)[::-1][:10])
    basis = features.basis
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-10)


def test_equal_cost_shape_costs_a_full_bypass():
    for d in (64, 576, 640, 4096):
        rank, k = equal_cost_shape(d)
        assert 2 * d * rank + 3 * d * k == d * d


def test_kept_neurons_explain_what_the_linear_part_cannot():
    """Neurons add what no linear map of ``x P`` has: the error drops well below the same basis's alone. (Whether
    they beat a d x d map depends on the model's activations: on SmolLM2 and Gemma-3-270m see the README.)"""
    model = tiny_model("llama")
    rows, linear = stored_rows(model, 1)
    ffn = gated_ffn(model, 1)
    rank, k = equal_cost_shape(ffn.gate.shape[0])
    errors = {}
    for n in (0, k):
        features = choose_features(linear, energy_of(rows, ffn), ffn, rank, n)
        bypass, errors[n] = fit_neurons(features, feature_stats(features, rows, linear, NUMPY), 0.01, NUMPY)
    assert bypass.num_params == fit_bypass(linear, ridge=0.01)[0].num_params
    assert errors[k] < 0.85 * errors[0], errors


def calibrate(family: str, ffn_bypass: str, weighting: str = "uniform", **kwargs):
    config = SubFitConfig(sparsity=0.35, num_samples=16, seq_len=32, ffn_bypass=ffn_bypass, weighting=weighting)
    return calibrate_model(tiny_model(family), CALIBRATION, config, **kwargs)


def test_auto_keeps_the_shape_with_less_fit_error():
    """The first removed FFN sees the same upstream under every setting: auto takes the better of the two."""
    for family in ("llama", "gemma3"):
        first = {mode: calibrate(family, mode).plan.removed_units("mlp")[0] for mode in ("linear", "neurons", "auto")}
        assert first["linear"].bypass.form == "full" and first["neurons"].bypass.form == "neurons"
        best = min(("linear", "neurons"), key=lambda m: first[m].fit_error)
        assert first["auto"].bypass.form == first[best].bypass.form
        assert first["auto"].fit_error == pytest.approx(first[best].fit_error, rel=1e-9)
        assert first["neurons"].bypass.params == first["linear"].bypass.params


def test_non_gated_ffns_keep_the_linear_bypass():
    plan = calibrate("gpt2", "neurons").plan
    assert plan.removed_units("mlp") and {u.bypass.form for u in plan.removed_units("mlp")} == {"full"}


@pytest.mark.parametrize("weighting", ["uniform", "auto"])
def test_the_calibrated_model_is_what_the_plan_says(weighting):
    """The model left compressed (after the weighting check's refit on every row, with ``auto``) computes what
    ``apply_plan`` builds from the saved plan: the refitted neurons are the ones installed and recorded."""
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.35, num_samples=16, seq_len=32, ffn_bypass="neurons", weighting=weighting)
    result = calibrate_model(model, CALIBRATION, config, keep_compressed=True)
    assert {u.bypass.form for u in result.plan.removed_units("mlp")} == {"neurons"}
    rebuilt = apply_plan(tiny_model("llama"), result.plan, result.tensors)
    ids = torch.as_tensor(CALIBRATION[:2])
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), rebuilt(ids).logits.numpy(), atol=1e-5)


def test_plan_with_neurons_round_trips(tmp_path):
    result = calibrate("gemma3", "neurons")
    CalibratedPlan(result.plan, result.tensors).save(tmp_path / "plan")
    plan, tensors = load_plan(tmp_path / "plan")
    unit = plan.removed_units("mlp")[0]
    rank, k = equal_cost_shape(plan.model.hidden_size)
    assert (unit.bypass.form, unit.bypass.rank, unit.bypass.neurons) == ("neurons", rank, k)
    assert unit.bypass.activation == "gelu_pytorch_tanh"
    assert plan.method.ffn_bypass == "neurons"
    for role in ("neuron_gate", "neuron_up", "neuron_out", "down", "up", "bias"):
        np.testing.assert_array_equal(tensors[unit.bypass.tensors[role]], result.tensors[unit.bypass.tensors[role]])


def test_a_plan_with_an_unknown_activation_is_refused(tmp_path):
    result = calibrate("llama", "neurons")
    CalibratedPlan(result.plan, result.tensors).save(tmp_path / "plan")
    path = tmp_path / "plan" / "subfit_plan.json"
    data = json.loads(path.read_text())
    unit = next(u for u in data["removed"] if u["bypass"]["form"] == "neurons")
    unit["bypass"]["activation"] = "relu2"
    path.write_text(json.dumps(data))
    with pytest.raises(SubFitError, match="not a valid SubFit plan"):
        load_plan(path)


def test_neurons_need_unit_output_targets_and_bypasses():
    for bad in ({"target": "dense_stream"}, {"bypass": False}):
        with pytest.raises(SubFitError, match="ffn_bypass 'neurons' needs"):
            make_config(None, 0.25, ffn_bypass="neurons", **bad)


def test_auto_is_the_default_and_keeps_linear_bypasses_where_neurons_cannot_be_fitted():
    """auto, the default, takes neurons only where the backend reads them and bypasses fit unit outputs."""
    assert SubFitConfig().ffn_bypass == "auto"
    assert SubFitConfig().refits_ffn_neurons(backend_reads_neurons=True)
    assert not SubFitConfig().refits_ffn_neurons(backend_reads_neurons=False)
    for other in ({"target": "dense_stream"}, {"bypass": False}):
        config = make_config(None, 0.25, **other)
        assert config.ffn_bypass == "auto" and not config.refits_ffn_neurons(backend_reads_neurons=True)
    config = SubFitConfig(sparsity=0.35, num_samples=16, seq_len=32, target="dense_stream")
    removed = calibrate_model(tiny_model("llama"), CALIBRATION, config).plan.removed_units("mlp")
    assert removed and {u.bypass.form for u in removed} == {"full"}


def test_both_backends_shape_ffn_bypasses_alike_under_the_default(tmp_path, tiny_checkpoint, tiny_export,
                                                                  tiny_calibration_text):
    """``auto`` on an export alone (ONNX Runtime) keeps the units and FFN bypass shapes of the PyTorch backend on
    the checkpoint it was exported from."""
    forms = {}
    for backend, source in (("onnx", tiny_export("llama")), ("torch", tiny_checkpoint("llama"))):
        result = CliRunner().invoke(app, ["calibrate", str(source), "--calibration-backend", backend, "-s", "0.5",
                                          "-c", str(tiny_calibration_text), "-n", "8", "-l", "32",
                                          "-o", str(tmp_path / backend)])
        assert result.exit_code == 0, result.output
        plan, _ = load_plan(tmp_path / backend)
        assert plan.method.ffn_bypass == "auto" and plan.calibration["backend"] == backend
        forms[backend] = [(u.key, u.bypass.form) for u in plan.removed]
    assert forms["onnx"] == forms["torch"] and any(key.endswith(".mlp") for key, _ in forms["torch"])


def test_a_backend_that_cannot_read_ffns_refuses_neurons_in_one_line(tmp_path, tiny_export, tiny_calibration_text,
                                                                     monkeypatch):
    from subfit_onnx.calibration.onnx_backend import OrtLayerRunner

    monkeypatch.setattr(OrtLayerRunner, "reads_ffn_neurons", False)
    result = CliRunner().invoke(app, ["calibrate", str(tiny_export("llama")), "--calibration-backend", "onnx",
                                      "--ffn-bypass", "neurons", "-c", str(tiny_calibration_text), "-n", "8",
                                      "-l", "32", "-o", str(tmp_path / "plan")])
    assert result.exit_code != 0
    assert "needs a calibration backend that reads FFN weights" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "plan").exists()


def test_the_onnx_backend_calibrates_neurons_from_the_cli(tmp_path, tiny_export, tiny_calibration_text):
    """An export alone (no checkpoint): the plan's FFN bypasses keep neurons, and the summary says so."""
    result = CliRunner().invoke(app, ["calibrate", str(tiny_export("llama")), "--calibration-backend", "onnx",
                                      "--ffn-bypass", "neurons", "-s", "0.5", "-c", str(tiny_calibration_text),
                                      "-n", "8", "-l", "32", "-o", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    plan, _ = load_plan(tmp_path / "plan")
    assert plan.calibration["backend"] == "onnx"
    assert plan.removed_units("mlp") and {u.bypass.form for u in plan.removed_units("mlp")} == {"neurons"}


def test_optimize_with_neurons_matches_the_reference(tmp_path, tiny_checkpoint, tiny_calibration_text):
    """From the CLI flag to the ONNX graph: ONNX Runtime computes what the PyTorch reference of the plan does."""
    import onnxruntime as ort

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["optimize", str(tiny_checkpoint("llama")), "-s", "0.5", "--ffn-bypass",
                                      "neurons", "-c", str(tiny_calibration_text), "-n", "8", "-l", "32",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan, tensors = load_plan(out)
    layers = [str(u.layer) for u in plan.removed_units("mlp") if u.bypass.form == "neurons"]
    assert layers and f"the FFN bypasses of layers {', '.join(layers)} keep some neurons" in result.stdout
    reference = apply_plan(tiny_model("llama"), plan, tensors)
    ids = np.random.default_rng(1).integers(3, 99, size=(1, 12))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None]}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-3)




@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_neurons_change_the_ffn_bypasses_and_nothing_else(family):
    """Pass 2 decides with linear FFN bypasses: the same units go, with the same attention bypasses, as linear.
    Under auto an FFN before the first one that took neurons has linear's bypass exactly; one after it that keeps
    a linear bypass was refitted on the upstream with neurons, so its bypass differs from linear's."""
    config = {"sparsity": 0.75, "num_samples": 16, "seq_len": 32}
    plans = {mode: calibrate_model(tiny_model(family), CALIBRATION, SubFitConfig(ffn_bypass=mode, **config))
             for mode in ("linear", "neurons", "auto")}
    linear = plans["linear"]
    assert linear.plan.removed_units("attention") and len(linear.plan.removed_units("mlp")) >= 2
    for mode in ("neurons", "auto"):
        result = plans[mode]
        assert result.plan.depth_map() == linear.plan.depth_map()
        assert result.plan.sparsity.net == pytest.approx(linear.plan.sparsity.net, abs=1e-6)
        attention = [k for k in linear.tensors if ".attention." in k]
        assert attention and all(np.array_equal(result.tensors[k], linear.tensors[k]) for k in attention)
    assert {u.bypass.form for u in plans["neurons"].plan.removed_units("mlp")} == {"neurons"}
    auto_ffns = plans["auto"].plan.removed_units("mlp")
    first = min((u.layer for u in auto_ffns if u.bypass.form == "neurons"), default=len(auto_ffns) + 99)
    checked = {"before": 0, "after": 0}
    for unit in auto_ffns:
        names = [k for k in linear.tensors if k.startswith(f"{unit_key(unit.layer, 'mlp')}.")]
        if unit.bypass.form == "full" and unit.layer != first:
            same = all(np.array_equal(plans["auto"].tensors[k], linear.tensors[k]) for k in names)
            assert names and same == (unit.layer < first)
            checked["before" if unit.layer < first else "after"] += 1
    # llama: neurons at the first FFN and a linear one after them; gemma3: every FFN keeps its linear bypass
    assert checked == ({"before": 0, "after": 1} if family == "llama" else {"before": 4, "after": 0}), checked


@pytest.mark.parametrize(("layers", "note"), [
    ([19], "; the FFN bypass of layer 19 keeps some neurons"),
    ([17, 19], "; the FFN bypasses of layers 17, 19 keep some neurons"),
    ([], ""),
])
def test_the_summary_names_the_ffns_with_neurons_in_plain_english(layers, note):
    from subfit_onnx.report import _neuron_note

    removed = [{"layer": n, "kind": "mlp", "bypass": "neurons"} for n in layers]
    removed.append({"layer": 3, "kind": "mlp", "bypass": "linear"})
    assert _neuron_note({"removed": removed}) == note
