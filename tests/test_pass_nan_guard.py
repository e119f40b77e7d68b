"""DropSoftmaxNanGuardPass: calibration's private copy loses the softmax NaN guards, bit for bit on a prefill.

The guard matters only for a row whose every key is masked; a left-padded prompt has such rows, and that is
where the graph without it gives NaN (which is why only calibration's copy drops it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from rewrite_helpers import ort_prefill_decode, session
from subfit_onnx.calibration.onnx_session import prefill_inputs
from subfit_onnx.passes.nan_guard import DropSoftmaxNanGuardPass
from tiny_models import FAMILY_CONFIGS

IDS = np.random.default_rng(0).integers(3, 256, size=(2, 12))
NEXT = np.random.default_rng(1).integers(3, 256, size=(2, 1))


def _ops(model: ir.Model, op: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op)


def _without_guards(folder, out):
    model = ir.load(folder / "model.onnx")
    guards, wheres = _ops(model, "IsNaN"), _ops(model, "Where")
    result = DropSoftmaxNanGuardPass()(model)
    ir.save(model, out / "model.onnx", external_data="model.onnx_data")
    return model, guards, wheres, result.modified


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_every_layer_loses_its_guard_and_logits_stay_bit_identical(family, tiny_export, tmp_path):
    folder = tiny_export(family)
    model, guards, wheres, modified = _without_guards(folder, tmp_path)
    assert modified and guards == FAMILY_CONFIGS[family]["num_hidden_layers"]
    assert _ops(model, "IsNaN") == 0 and _ops(model, "Where") == wheres - guards
    assert not DropSoftmaxNanGuardPass()(model).modified
    before = ort_prefill_decode(folder / "model.onnx", IDS, NEXT)
    after = ort_prefill_decode(tmp_path / "model.onnx", IDS, NEXT)
    np.testing.assert_array_equal(after[0], before[0])  # prefill from an empty past, as calibration runs
    np.testing.assert_array_equal(after[1], before[1])


def _padded_logits(path) -> np.ndarray:
    """A left-padded prefill: the first row's first three positions see no key at all."""
    batch, seq = IDS.shape
    feed = prefill_inputs(list(ir.load(path).graph.inputs), batch, seq, None, None)
    feed["attention_mask"][0, :3] = 0
    feed["input_ids"] = IDS
    return session(path).run(["logits"], feed)[0]


def test_fully_masked_rows_are_where_the_guard_mattered(tiny_export, tmp_path):
    folder = tiny_export("llama")
    _without_guards(folder, tmp_path)
    assert np.isfinite(_padded_logits(folder / "model.onnx")).all()
    assert np.isnan(_padded_logits(tmp_path / "model.onnx")[0, :3]).all()
