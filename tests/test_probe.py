"""score="end_to_end": each unit's probe distance against a hand-made one, and selection by it."""

import numpy as np
import pytest

from subfit_onnx.calibration.calibrate import Calibrator, EndToEndPrior, probe_units
from subfit_onnx.calibration.end_to_end import stream_distance
from subfit_onnx.calibration.selection import greedy_select
from subfit_onnx.calibration.torch_backend import TorchLayerRunner
from subfit_onnx.config import SubFitConfig
from subfit_onnx.reference import install_bypass
from subfit_onnx.torch_model import model_family
from tiny_models import last_stream, tiny_model

TOKENS = np.random.default_rng(3).integers(0, 256, size=(16, 32))


@pytest.mark.parametrize("family, rows", [("llama", 16), ("gemma3", 16), ("llama", 3)])
def test_probe_distance_is_the_whole_model_with_that_unit_alone_replaced(family, rows):
    """The probes run together, each unit on its own rows of the store from the unit's layer on (in waves when the
    store has fewer rows than units: 3 rows); the reference runs the whole model with that unit alone replaced."""
    model = tiny_model(family)
    tokens = TOKENS[:rows]
    config = SubFitConfig(sparsity=0.3, num_samples=rows, seq_len=32, batch_size=4, score="end_to_end",
                          weighting="auto" if rows == 16 else "uniform")  # too few rows to hold any out
    assert 2 * model.config.num_hidden_layers > rows or rows == 16
    runner = TorchLayerRunner(model, tokens, config.batch_size)
    try:
        cal = Calibrator(runner, config)
        dense = cal.dense_pass()
        probe_units(cal, dense)
        embeddings = np.array(runner.store.current)
        np.testing.assert_array_equal(embeddings, np.load(runner.store._saved["start"]))  # store left as found
    finally:
        runner.close()
    distances = dense.end_to_end  # one probe for both candidates, under uniform's bypasses
    dense_last = last_stream(model, tokens[-1:])
    checked = 0
    bypassed = dense.by_weighting()["uniform"]
    assert set(distances) == set(bypassed)
    for (i, kind), d in distances.items():
        swap = install_bypass(model, model_family(model), i, kind, bypassed[(i, kind)].bypass)
        try:
            expected = stream_distance(last_stream(model, tokens[-1:]), dense_last)
        finally:
            swap.undo()
        assert d == pytest.approx(expected, rel=1e-4, abs=1e-9)
        checked += d > 1e-6
    assert checked == len(distances)  # every bypass moves the stream


def test_oneshot_end_to_end_removes_the_smallest_distance_per_parameter():
    from subfit_onnx.calibration.calibrate import calibrate_model

    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=4, score="end_to_end",
                          schedule="oneshot")
    result = calibrate_model(model, TOKENS, config)
    distances = result.dense.end_to_end
    runner_params = {(u.layer, u.kind): u.params_removed for u in result.plan.removed}
    from subfit_onnx.torch_model import unit_param_table

    params = unit_param_table(model)
    chosen = greedy_select({k: d / params[k] for k, d in distances.items()}, params,
                           np.ceil(0.3 * sum(params.values())))
    assert sorted(runner_params) == chosen
    assert result.plan.method.score == "end_to_end"


def test_fresh_estimate_scales_the_probe_distance_by_the_growth_of_the_local_damage():
    prior = EndToEndPrior(distance={(0, "mlp"): 0.02, (1, "mlp"): 0.05}, local={(0, "mlp"): 0.1, (1, "mlp"): 0.0})
    assert prior.estimate((0, "mlp"), 0.3) == pytest.approx(0.06)
    assert prior.estimate((1, "mlp"), 0.3) == pytest.approx(0.05)  # no local damage before: nothing to scale by


@pytest.mark.parametrize("flag, score", [((), "end_to_end"), (("--score", "stream_error"), "stream_error")])
def test_the_score_flag(tiny_checkpoint, tiny_calibration_text, tmp_path, flag, score):
    from typer.testing import CliRunner

    from subfit_onnx.cli import app
    from subfit_onnx.plan import load_plan

    args = ["calibrate", str(tiny_checkpoint("llama")), "-s", "0.3", "-c", str(tiny_calibration_text), "-n", "16",
            "-l", "32", "--json", "-o", str(tmp_path / "plan"), *flag]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert load_plan(tmp_path / "plan")[0].method.score == score
    bad = CliRunner().invoke(app, [*args[:-2], "--score", "cosine"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
