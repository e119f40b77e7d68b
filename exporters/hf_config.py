"""The config.json written beside a rewritten graph: the export's own, plus a ``subfit`` section.

One adjustment goes beyond bookkeeping. ``ORTModelForCausalLM`` builds the empty past for the first forward
from config.json alone: it reads ``num_key_value_heads`` only for the model types it lists and otherwise uses
``num_attention_heads`` heads of ``hidden_size // num_attention_heads`` (``head_dim`` for a few types). For a
grouped-query Phi-3 or Gemma-2 that shape disagrees with the graph's KV inputs and ONNX Runtime rejects the
first call, with or without SubFit. When that happens, ``num_attention_heads`` and ``hidden_size`` are written
as the values that make Optimum's guess equal the graph's ``[batch, kv_heads, 0, head_dim]``; the true values
stay under ``subfit.original_config``. Only ONNX Runtime reads this folder's config (there are no PyTorch
weights in it), and nothing else in ``ORTModelForCausalLM`` or ``generate`` reads those two fields.
"""

from __future__ import annotations

from typing import Any

from ..model_config import config_key, config_value

# optimum-onnx 0.1.0, ORTModelForCausalLM.__init__: model types whose empty past uses num_key_value_heads ...
OPTIMUM_KV_HEAD_TYPES = frozenset({
    "arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss", "helium", "mistral",
    "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3", "stablelm",
})
# ... and whose head size comes from config.head_dim rather than hidden_size // num_attention_heads.
OPTIMUM_HEAD_DIM_TYPES = frozenset({"gemma", "gemma3_text", "gpt_oss", "nemotron"})

def optimum_empty_past(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(heads, head_dim) of the empty past Optimum will build from this config."""
    model_type = config.get("model_type")
    heads = config_value(config, "num_attention_heads")
    hidden = config_value(config, "hidden_size")
    kv = config_value(config, "num_key_value_heads") if model_type in OPTIMUM_KV_HEAD_TYPES else heads
    if model_type in OPTIMUM_HEAD_DIM_TYPES:
        head_dim = config_value(config, "head_dim")
    else:
        head_dim = hidden // heads if hidden and heads else None
    return kv, head_dim


def fit_optimum_empty_past(config: dict[str, Any], kv_heads: int | None, head_dim: int | None) -> dict[str, Any]:
    """Overrides (field -> written value) that make Optimum's empty past match the graph; {} when it already does."""
    if kv_heads is None or head_dim is None or optimum_empty_past(config) == (kv_heads, head_dim):
        return {}
    model_type = config.get("model_type")
    if model_type in OPTIMUM_KV_HEAD_TYPES:
        return {}  # Optimum reads the true fields there; a mismatch would be the export's own
    overrides: dict[str, Any] = {"num_attention_heads": kv_heads}
    if model_type not in OPTIMUM_HEAD_DIM_TYPES:
        overrides["hidden_size"] = kv_heads * head_dim
    return overrides


def subfit_config(export_config: dict[str, Any], section: dict[str, Any], kv_heads: int | None,
                  head_dim: int | None, has_kv_cache: bool) -> dict[str, Any]:
    """The export's config with the ``subfit`` section and whatever Optimum needs to load the graph."""
    config = dict(export_config)
    overrides = fit_optimum_empty_past(config, kv_heads, head_dim)
    section = dict(section)
    if overrides:
        section["original_config"] = {k: config_value(config, k) for k in overrides}
        section["note"] = ("num_attention_heads/hidden_size are set so that optimum's ORTModelForCausalLM sizes "
                           "the empty KV cache like the graph's inputs; true values in original_config")
        for field, value in overrides.items():
            config[config_key(config, field)] = value
    if not has_kv_cache:
        config["use_cache"] = False
        section["use_cache"] = "no attention is left, so the graph has no KV cache: load with use_cache=False"
    config["subfit"] = section
    return config


