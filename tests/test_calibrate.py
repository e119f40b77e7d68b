"""Calibration on tiny random models of every family: sparsity, fit quality, plan round-trip, reference."""

import numpy as np
import pytest
import torch

from progress_recorder import Recorder
from subfit_onnx.bypass import Bypass
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.errors import PlanMismatchError, SubFitError, UnsupportedModelError
from subfit_onnx.plan import RemovedUnit, bypass_spec, bypass_tensors, load_plan, save_plan
from subfit_onnx.reference import apply_plan
from subfit_onnx.torch_model import decoder_layers, model_family
from tiny_models import FAMILY_CONFIGS, tiny_model

TOKENS = np.random.default_rng(0).integers(0, 256, size=(8, 32))


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def calibrated(request):
    model = tiny_model(request.param)
    config = SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=4, attention_rank=Portion(count=8))
    before = model(torch.as_tensor(TOKENS[:2])).logits
    result = calibrate_model(model, TOKENS, config)
    after = model(torch.as_tensor(TOKENS[:2])).logits
    return request.param, model, result, before, after


def test_sparsity_within_one_unit_of_target(calibrated):
    _, _, result, _, _ = calibrated
    s = result.plan.sparsity
    biggest = max(result.plan.model.attention_params_per_layer, result.plan.model.mlp_params_per_layer)
    assert s.target <= s.achieved < s.target + biggest / s.block_params
    assert s.removed_params == sum(u.params_removed for u in result.plan.removed)
    assert s.net == pytest.approx((s.removed_params - s.bypass_params) / s.block_params)


def test_every_bypass_beats_dropping_the_unit(calibrated):
    _, _, result, _, _ = calibrated
    assert result.plan.removed
    for unit in result.plan.removed:
        assert 0.0 <= unit.fit_error < unit.drop_error == 1.0, unit


def test_model_is_restored_after_calibration(calibrated):
    _, _, _, before, after = calibrated
    assert torch.equal(before, after)


def test_plan_round_trip_and_reference(calibrated, tmp_path):
    family, _, result, before, _ = calibrated
    save_plan(result.plan, result.tensors, tmp_path)
    plan, tensors = load_plan(tmp_path)
    assert plan == result.plan
    assert set(tensors) == set(result.tensors)
    compressed = apply_plan(tiny_model(family), plan, tensors)
    out = compressed(torch.as_tensor(TOKENS[:2])).logits
    assert not torch.allclose(out, before)  # it really changed the model
    assert torch.isfinite(out).all()


def test_plan_for_another_model_is_refused(calibrated, tmp_path):
    family, _, result, _, _ = calibrated
    other = "gpt2" if family != "gpt2" else "llama"
    with pytest.raises(PlanMismatchError, match="the plan does not match the model.*family"):
        apply_plan(tiny_model(other), result.plan, result.tensors)


def test_apply_plan_equals_hand_built_reference():
    """Remove layer 1's MLP by hand (patching the MLP's forward with x @ W + b) and via apply_plan."""
    model = tiny_model("llama")
    result = calibrate_model(model, TOKENS, SubFitConfig(sparsity=0.2, num_samples=8, seq_len=32, attention_rank=Portion()))
    unit = result.plan.removed[0]
    plan = result.plan.model_copy(update={"removed": [unit]})
    w = torch.as_tensor(result.tensors[f"{unit.key}.weight"]) if unit.bypass.form == "full" else None
    if w is None:
        w = torch.as_tensor(result.tensors[f"{unit.key}.down"]) @ torch.as_tensor(result.tensors[f"{unit.key}.up"])
    b = torch.as_tensor(result.tensors[f"{unit.key}.bias"])

    by_hand = tiny_model("llama")
    layer = decoder_layers(by_hand, model_family(by_hand))[unit.layer]
    if unit.kind == "mlp":
        layer.mlp.forward = lambda x: x @ w + b
    else:
        layer.self_attn.forward = lambda hidden_states, **kw: (hidden_states @ w + b, None)
    expected = by_hand(torch.as_tensor(TOKENS[:2])).logits
    got = apply_plan(tiny_model("llama"), plan, result.tensors)(torch.as_tensor(TOKENS[:2])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_removed_attention_keeps_a_one_wide_kv_entry_and_generates():
    """Layer 0's and 2's attention go: their cache entries are one wide (positions still counted), decoding with
    the cache equals recomputing the whole sequence."""
    model = tiny_model("llama")
    result = calibrate_model(model, TOKENS, SubFitConfig(sparsity=0.1, num_samples=8, seq_len=32))
    rng = np.random.default_rng(5)
    units, tensors = [], {}
    for layer in (0, 2):
        bypass = Bypass(weight=rng.normal(size=(64, 64)) / 8, bias=rng.normal(size=64))
        key = f"layers.{layer}.attention"
        tensors.update(bypass_tensors(key, bypass))
        units.append(RemovedUnit(layer=layer, kind="attention", score=0, fit_error=0.5, stream_error=0.1,
                                 params_removed=result.plan.model.attention_params_per_layer,
                                 bypass=bypass_spec(key, bypass)))
    plan = result.plan.model_copy(update={"removed": units})
    ref = apply_plan(tiny_model("llama"), plan, tensors)
    prompt = torch.as_tensor(TOKENS[:1, :6])
    out = ref.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    widths = [layer.keys.shape[-1] for layer in out.past_key_values.layers]
    assert widths == [1, 16, 1, 16]
    seq = out.sequences
    full = ref(seq[:, :-1]).logits.argmax(-1)[:, prompt.shape[1] - 1:]
    assert torch.equal(full, seq[:, prompt.shape[1]:])


def test_bad_inputs_are_refused():
    with pytest.raises(SubFitError):
        calibrate_model(tiny_model("llama"), TOKENS, SubFitConfig(sparsity=0.95, num_samples=8, seq_len=32))
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(UnsupportedModelError, match="not supported; SubFit supports: llama"):
        calibrate_model(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                   intermediate_size=32)), TOKENS, SubFitConfig())


def test_prior_samples_limits_pass_one_only():
    """Pass 1 (scoring priors) runs on the first rows only; pass 2 (selection and fits) still sees them all."""
    progress = Recorder()
    config = SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=2, prior_samples=Portion(fraction=0.25))
    result = calibrate_model(tiny_model("llama"), TOKENS, config, progress=progress)
    assert progress.done("scoring") == {2}  # a quarter of 8 sequences
    assert progress.done("fitting") == progress.done("embedding") == {8}
    assert result.plan.sparsity.achieved >= 0.3
    assert config.prior_rows(8) == 2 and SubFitConfig(prior_samples=Portion(count=3)).prior_rows(8) == 3
    assert SubFitConfig(prior_samples=Portion(count=30)).prior_rows(8) == 8 == SubFitConfig(prior_samples=Portion()).prior_rows(8)
    assert SubFitConfig().prior_rows(64) == 32  # the default: half
    with pytest.raises(ValueError):
        SubFitConfig(prior_samples=Portion(fraction=1.5))
    with pytest.raises(ValueError):
        Portion(count=3, fraction=0.5)


def test_ranks_are_a_count_a_fraction_of_the_hidden_size_or_full():
    assert SubFitConfig().rank_for("attention", 576) == 72 and SubFitConfig().rank_for("mlp", 576) is None
    assert SubFitConfig(mlp_rank=Portion(count=16)).rank_for("mlp", 576) == 16
    assert SubFitConfig(attention_rank=Portion(fraction=0.001)).rank_for("attention", 64) == 1
    with pytest.raises(ValueError, match="below 1"):
        SubFitConfig(attention_rank=Portion(fraction=1.0))


def test_numpy_blas_runs_single_threaded_while_calibrating():
    """Statistics and fits must not fight the backend's threads (see ``single_threaded_blas``); restored after."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    before = blas_threads()
    during: list[tuple[str, set[int]]] = []
    progress = Recorder(on_update=lambda desc: during.append((desc, blas_threads())))
    config = SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=4)
    calibrate_model(tiny_model("llama"), TOKENS, config, progress=progress)
    sweeps = [threads for desc, threads in during if not desc.startswith("embedding")]  # before calibration
    assert sweeps and all(t == {1} for t in sweeps)
    assert blas_threads() == before


def test_calibration_stream_equals_the_compressed_model():
    """The stream pass 2 carries (outputs of FFN-bypassed layers are written as mid + bypass(x), not re-run)
    must be exactly what the compressed model computes, or every later unit is measured on the wrong inputs."""
    from subfit_onnx.calibration.calibrate import run_calibration
    from subfit_onnx.calibration.torch_backend import TorchLayerRunner

    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.4, num_samples=8, seq_len=32, batch_size=4)
    runner = TorchLayerRunner(model, TOKENS, config.batch_size)
    try:
        result = run_calibration(runner, config, keep_compressed=True)
        carried = np.array(runner.store.current)
    finally:
        runner.close()
    assert any(u.kind == "mlp" for u in result.plan.removed)
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(torch.as_tensor(TOKENS))
    handle.remove()
    np.testing.assert_allclose(carried, seen["h"].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weighting, rows", [("stream", 8), ("auto", 16)])
def test_pass_2_stops_fitting_once_the_budget_is_met(weighting, rows, monkeypatch):
    """Layers after the last possible removal are not run for fits; only the weighting check's held-out rows go
    on to the last layer. The plan is the one a pass 2 over every layer gives."""
    tokens = np.random.default_rng(3).integers(0, 256, size=(rows, 32))
    model = tiny_model("llama", overrides={"num_hidden_layers": 6})
    with torch.no_grad():  # the first layers' units barely write to the stream: they go first
        for layer in model.model.layers[:3]:
            layer.mlp.down_proj.weight.mul_(0.01)
            layer.self_attn.o_proj.weight.mul_(0.01)
    config = SubFitConfig(sparsity=0.2, num_samples=rows, seq_len=32, batch_size=4, weighting=weighting)
    progress = Recorder()
    early = calibrate_model(model, tokens, config, progress=progress)
    last = max(u.layer for u in early.plan.removed)
    assert last < 3  # the budget is met well before the last layer

    def layers(prefix: str, label: str) -> set[int]:
        return {int(d[len(prefix):].split("/")[0]) for d in progress.bars if d.startswith(prefix) and label in d}

    winner = f"({early.plan.calibration['weighting']}-weighted)" if weighting == "auto" else ""
    assert max(layers("fitting layer ", winner)) == last + 1
    for label in ("(stream-weighted)", "(uniform-weighted)") if weighting == "auto" else ():
        fitted, held = layers("fitting layer ", label), layers("held-out rows layer ", label)
        assert fitted | held == set(range(1, 7)) and max(fitted) < min(held)  # held-out rows reach the end
    if weighting != "auto":
        assert not [d for d in progress.bars if d.startswith("held-out rows layer")]

    monkeypatch.setattr("subfit_onnx.calibration.selection.SequentialSelector.done", property(lambda self: False))
    full = calibrate_model(model, tokens, config)
    assert early.plan.removed == full.plan.removed
    assert early.plan.calibration == full.plan.calibration
    for name, tensor in full.tensors.items():
        np.testing.assert_array_equal(early.tensors[name], tensor)


def test_check_candidates_share_pass_2_until_one_removes(monkeypatch):
    """``weighting="auto"`` runs the layers no candidate removes from once, with both weightings' statistics; each
    candidate's pass 2 starts where the first removal is. The plan is the one separate passes 2 give."""
    tokens = np.random.default_rng(4).integers(0, 256, size=(16, 32))
    model = tiny_model("llama", overrides={"num_hidden_layers": 6})
    with torch.no_grad():  # the last layers' units barely write to the stream: they go, the first ones stay
        for layer in model.model.layers[3:]:
            layer.mlp.down_proj.weight.mul_(0.01)
            layer.self_attn.o_proj.weight.mul_(0.01)
    config = SubFitConfig(sparsity=0.2, num_samples=16, seq_len=32, batch_size=4, weighting="auto")
    progress = Recorder()
    shared = calibrate_model(model, tokens, config, progress=progress)
    first = min(u.layer for u in shared.plan.removed)
    assert first >= 3

    def layers(label: str) -> set[int]:
        return {int(d.split(" ")[2].split("/")[0]) for d in progress.bars if d.startswith("fitting") and label in d}

    once = layers("(every weighting)")
    assert once and max(once) <= first + 1 and once == set(range(1, max(once) + 1))
    for w in ("stream", "uniform"):
        assert min(layers(f"({w}-weighted)")) == max(once)  # each resumes at the layer where they part

    monkeypatch.setattr("subfit_onnx.calibration.calibrate.shared_prefix", lambda cal, selectors: 0)
    separate = calibrate_model(model, tokens, config)
    assert shared.plan.removed == separate.plan.removed
    assert shared.plan.calibration == separate.plan.calibration
    for name, tensor in separate.tensors.items():
        np.testing.assert_array_equal(shared.tensors[name], tensor)
