"""LoadExternalTensorsPass: a rewrite of a model whose Constants live in model.onnx_data saves a loadable file."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewrite_helpers import hand_plan, ort_prefill_decode, rel_diff
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.exporters.rewrite import plan_bypasses
from subfit_onnx.passes.external_data import LoadExternalTensorsPass
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def all_external(tmp_path_factory):
    """A tiny export re-saved with every tensor, Constant attributes included, in model.onnx_data.

    This is how torch lays out exports over 2 GB (one small Constant's bytes among the weights), at tiny size.
    """
    root = tmp_path_factory.mktemp("ext")
    tiny_model("llama").save_pretrained(root / "hf")
    dense = export_decoder(root / "hf", root / "dense")
    proto = onnx.load(dense)
    onnx.external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0, convert_attribute=True)
    (root / "ext").mkdir()
    onnx.save(proto, root / "ext" / "model.onnx")
    shutil.copy(dense.parent / "config.json", root / "ext")
    return dense, root / "ext" / "model.onnx"


def external_attributes(model: ir.Model) -> int:
    return sum(isinstance(a.value, ir.ExternalTensor) for n in model.graph for a in n.attributes.values()
               if a.type == ir.AttributeType.TENSOR)


def test_pass_loads_attribute_tensors_and_small_initializers(all_external):
    model = ir.load(all_external[1])
    assert external_attributes(model) > 50
    big = [v for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    step = LoadExternalTensorsPass(max_bytes=1024)
    step(model)
    assert external_attributes(model) == 0
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in big)  # weights stay on disk
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
                   if v.const_value.nbytes <= 1024)
    assert 0 < step.loaded_bytes < sum(v.const_value.nbytes for v in big)


@pytest.mark.parametrize("with_pass", [True, False])
def test_saved_rewrite_loads_in_onnxruntime_only_with_the_pass(all_external, tmp_path, with_pass):
    dense, ext = all_external
    plan, tensors = hand_plan(tiny_model("llama"), [(0, "attention", "lowrank"), (2, "mlp", "full")])
    ids = np.array([[5, 80, 13, 200]])
    expected = {}
    for name, source in (("inline", dense), ("external", ext)):
        model = ir.load(source)
        SubFitRewritePass(find_decoder_structure(model), plan_bypasses(plan, tensors))(model)
        if with_pass or name == "inline":
            LoadExternalTensorsPass(max_bytes=None if name == "inline" else 1024)(model)
        (tmp_path / name).mkdir()
        if name == "inline":
            ir.save(model, tmp_path / name / "model.onnx")
            expected = ort_prefill_decode(tmp_path / name / "model.onnx", ids, ids[:, :1])
            continue
        ir.save(model, tmp_path / name / "model.onnx", external_data="model.onnx_data", size_threshold_bytes=1024)
        if not with_pass:  # the Constants still point at offsets of the old data file
            with pytest.raises(Exception, match="external"):
                ort_prefill_decode(tmp_path / name / "model.onnx", ids, ids[:, :1])
            return
        onnx.checker.check_model(tmp_path / name / "model.onnx", full_check=True)
        got = ort_prefill_decode(tmp_path / name / "model.onnx", ids, ids[:, :1])
        assert rel_diff(got[0], expected[0]) == 0.0 and rel_diff(got[1], expected[1]) == 0.0
