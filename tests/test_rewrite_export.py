"""rewrite_export as an API: the folder it writes, the report's numbers, and what it refuses or never touches."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from rewrite_helpers import hand_plan, ort_prefill_decode
from subfit_onnx.errors import PlanMismatchError, SubFitError
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.exporters.rewrite import rewrite_export
from tiny_models import LAYERS, tiny_model

UNITS = [(0, "attention", "lowrank"), (1, "mlp", "full"), (3, "attention", "full")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewrite-api")
    out = {}
    for family in ("llama", "phi3"):
        tiny_model(family).save_pretrained(root / f"{family}-hf")
        folder = export_decoder(root / f"{family}-hf", root / family).parent
        (folder / "tokenizer.json").write_text('{"tiny": true}')
        (folder / "special_tokens_map.json").write_text("{}")
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def plan(exports):
    return hand_plan(tiny_model("llama"), UNITS)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_folder_report_and_config(exports, plan, tmp_path):
    before = digest(exports["llama"])
    report = rewrite_export(exports["llama"], *plan, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.onnx", "special_tokens_map.json", "tokenizer.json"]
    assert digest(exports["llama"]) == before  # the input is only read
    assert leftovers(tmp_path) == []

    p, _ = plan
    assert report.removed_units == ["layers.0.attention", "layers.1.mlp", "layers.3.attention"]
    assert report.removed_kv_layers == [0, 3]
    assert (report.kv_inputs_before, report.kv_inputs_after) == (2 * LAYERS, 2 * (LAYERS - 2))
    assert report.kv_bytes_per_token_after * LAYERS == report.kv_bytes_per_token_before * (LAYERS - 2)
    assert report.bypass_params == p.sparsity.bypass_params
    assert report.unit_params_removed == p.sparsity.removed_params
    assert report.nodes_after < report.nodes_before
    # two attentions (4 matrices each) and one FFN (3) go; 2 + 1 + 1 bypass matrices and 3 biases arrive
    assert report.initializers_after == report.initializers_before - 11 + 7
    assert report.file_bytes_after == (out / "model.onnx").stat().st_size
    saved_weights = 4 * (report.unit_params_removed - report.bypass_params)
    # float32 weights saved, plus the dead nodes' protobuf (about 100 bytes a node)
    dead_nodes = report.nodes_before - report.nodes_after
    assert saved_weights < report.file_bytes_before - report.file_bytes_after < saved_weights + 200 * dead_nodes
    assert not report.external_data and report.wall_seconds > 0

    config = json.loads((out / "config.json").read_text())
    assert config["subfit"]["removed"] == [{"layer": 0, "kind": "attention"}, {"layer": 1, "kind": "mlp"},
                                           {"layer": 3, "kind": "attention"}]
    assert config["subfit"]["kv_layers"] == [1, 2]
    assert config["num_attention_heads"] == 4 and "original_config" not in config["subfit"]


def test_phi3_config_sizes_optimums_empty_past_like_the_graph(exports, tmp_path):
    """Optimum sizes Phi-3's empty past with num_attention_heads (4); the graph caches 2 KV heads."""
    report = rewrite_export(exports["phi3"], *hand_plan(tiny_model("phi3"), UNITS), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["hidden_size"]) == (2, 32)
    assert config["subfit"]["original_config"] == {"num_attention_heads": 4, "hidden_size": 64}
    assert report.config_overrides == {"num_attention_heads": 2, "hidden_size": 32}


def test_all_attention_removed_turns_cache_off(exports, tmp_path):
    units = [(i, "attention", "full") for i in range(LAYERS)]
    report = rewrite_export(exports["llama"], *hand_plan(tiny_model("llama"), units), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_cache"] is False and config["subfit"]["kv_layers"] == []
    assert report.kv_inputs_after == 0 and report.kv_bytes_per_token_after == 0
    model = ir.load(tmp_path / "out" / "model.onnx")
    assert [v.name for v in model.graph.outputs] == ["logits"]


def test_external_data_layout_gives_identical_logits(exports, plan, tmp_path):
    inline = rewrite_export(exports["llama"], *plan, tmp_path / "inline", external_data=False)
    external = rewrite_export(exports["llama"], *plan, tmp_path / "external", external_data=True)
    assert external.external_data and (tmp_path / "external" / "model.onnx_data").is_file()
    assert (tmp_path / "external" / "model.onnx_data").stat().st_size > 0.8 * inline.file_bytes_after
    assert abs(external.file_bytes_after - inline.file_bytes_after) < 0.02 * inline.file_bytes_after
    ids = np.array([[4, 9, 200, 31]])
    a = ort_prefill_decode(tmp_path / "inline" / "model.onnx", ids, ids[:, :1])
    b = ort_prefill_decode(tmp_path / "external" / "model.onnx", ids, ids[:, :1])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # an external-data input (the output above, one more unit removed) stays external unless asked otherwise
    more = hand_plan(tiny_model("llama"), [(2, "mlp", "full")])
    kept = rewrite_export(tmp_path / "external", *more, tmp_path / "kept")
    assert kept.external_data and (tmp_path / "kept" / "model.onnx_data").is_file()
    rewrite_export(tmp_path / "external", *more, tmp_path / "inline-again", external_data=False)
    assert sorted(p.name for p in (tmp_path / "inline-again").iterdir() if "onnx" in p.name) == ["model.onnx"]
    for folder in ("kept", "inline-again"):
        assert ort_prefill_decode(tmp_path / folder / "model.onnx", ids, ids[:, :1])[0].shape == (1, 4, 256)


def test_existing_output_needs_overwrite(exports, plan, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SubFitError, match="already exists"):
        rewrite_export(exports["llama"], *plan, out)
    assert (out / "keep.txt").read_text() == "mine"
    rewrite_export(exports["llama"], *plan, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert leftovers(tmp_path) == []


def test_refuses_to_write_into_the_input(exports, plan):
    with pytest.raises(SubFitError, match="holds the input export"):
        rewrite_export(exports["llama"], *plan, exports["llama"], overwrite=True)
    with pytest.raises(SubFitError, match="holds the input export"):
        rewrite_export(exports["llama"] / "model.onnx", *plan, exports["llama"].parent, overwrite=True)
    with pytest.raises(SubFitError, match="no ONNX model"):
        rewrite_export(exports["llama"] / "missing", *plan, exports["llama"].parent / "x")


@pytest.mark.parametrize("field,value,message", [
    ("num_layers", 6, "does not match the ONNX graph .*: layers 6 vs 4"),
    ("hidden_size", 96, "hidden size 96 vs 64"),
    ("family", "gemma2", "family gemma2 vs llama"),
    ("num_key_value_heads", 4, "KV heads 4 vs 2"),
    ("mlp_params_per_layer", 1, "FFN parameters per layer 1 vs 24576"),
])
def test_refuses_a_plan_for_another_model(exports, plan, tmp_path, field, value, message):
    p, tensors = plan
    other = p.model_copy(update={"model": p.model.model_copy(update={field: value})})
    with pytest.raises(PlanMismatchError, match=message):
        rewrite_export(exports["llama"], other, tensors, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_refuses_missing_bypass_tensors(exports, plan, tmp_path):
    p, tensors = plan
    partial = {k: v for k, v in tensors.items() if not k.startswith("layers.1.mlp")}
    with pytest.raises(PlanMismatchError, match="layers.1.mlp.weight"):
        rewrite_export(exports["llama"], p, partial, tmp_path / "out")


def test_failure_while_saving_leaves_nothing(exports, plan, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk on fire"):
        rewrite_export(exports["llama"], *plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_rewritten_export_is_refused_as_input(exports, plan, tmp_path):
    rewrite_export(exports["llama"], *plan, tmp_path / "once")
    shutil.copy(exports["llama"] / "config.json", tmp_path / "once" / "config.json")
    with pytest.raises(PlanMismatchError, match="already a bypass"):
        rewrite_export(tmp_path / "once", *plan, tmp_path / "twice")
