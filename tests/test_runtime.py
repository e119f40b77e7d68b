"""load_for_generation: same greedy tokens as plain Optimum / PyTorch, the fast settings, Phi-3, no KV at all."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from subfit_onnx.errors import SubFitError
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.runtime import load_for_generation

PROMPT = torch.tensor([[40, 41, 42, 43, 44, 45]])
NEW = 12


def greedy(model) -> list[int]:
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, PROMPT.shape[1]:].tolist()


@pytest.fixture(scope="module")
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_same_tokens_as_plain_optimum(tiny_exports, torch_threads):
    from optimum.onnxruntime import ORTModelForCausalLM

    plain = greedy(ORTModelForCausalLM.from_pretrained(tiny_exports["dense"], file_name="model.onnx"))
    model = load_for_generation(tiny_exports["dense"])
    assert greedy(model) == plain
    assert len(plain) == NEW and len(set(plain)) > 1
    assert torch.get_num_threads() == 1
    so = model.session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # the raw ORT loop agrees too
    assert OnnxDecoder(tiny_exports["dense"]).greedy(PROMPT[0].tolist(), NEW) == plain


def test_gaps_and_no_kv_generate_the_dense_tokens(tiny_exports, torch_threads):
    dense = greedy(load_for_generation(tiny_exports["dense"]))
    assert greedy(load_for_generation(tiny_exports["gaps"])) == dense
    nokv = load_for_generation(tiny_exports["nokv"])
    assert not nokv.can_use_cache and nokv.generation_config.use_cache is False
    assert greedy(nokv) == dense
    assert OnnxDecoder(tiny_exports["nokv"]).greedy(PROMPT[0].tolist(), NEW) == dense


def test_phi3_kv_heads_from_the_graph(tiny_exports, tiny_checkpoint, torch_threads):
    """Optimum sizes Phi-3's empty past with num_attention_heads (4) instead of the 2 KV heads and fails."""
    from optimum.onnxruntime import ORTModelForCausalLM

    plain = ORTModelForCausalLM.from_pretrained(tiny_exports["phi3"], file_name="model.onnx")
    with pytest.raises(Exception, match="past_key_values"):
        greedy(plain)
    model = load_for_generation(tiny_exports["phi3"])
    assert model.num_key_value_heads == 2 and model.embed_size_per_head == 16
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("phi3"), dtype=torch.float32).eval()
    assert greedy(model) == greedy(reference)


def test_compressed_export_generates(tiny_compressed, torch_threads):
    model = load_for_generation(tiny_compressed)
    tokens = greedy(model)
    assert tokens == OnnxDecoder(tiny_compressed).greedy(PROMPT[0].tolist(), NEW)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(SubFitError, match="is not a folder"):
        load_for_generation(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SubFitError, match="has no model.onnx"):
        load_for_generation(tmp_path)


def test_provider_errors(tiny_exports):
    import onnxruntime as ort

    with pytest.raises(SubFitError, match="provider must be one of cpu, cuda"):
        load_for_generation(tiny_exports["dense"], provider="tpu")  # type: ignore[arg-type]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(SubFitError, match="CUDAExecutionProvider is not available"):
        load_for_generation(tiny_exports["dense"], provider="cuda")
