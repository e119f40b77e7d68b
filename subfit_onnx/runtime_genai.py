"""A ``genai_config.json`` for running an Optimum decoder export with onnxruntime-genai.

onnxruntime-genai normally runs Model Builder output; it runs an Optimum ``text-generation-with-past`` export
too when told the tensor names. What matters for Optimum graphs:
- KV names are printf templates (``past_key_values.%d.key``); onnxruntime-genai 0.18 finds the layers that
  exist from the session's inputs, so the gaps a SubFit rewrite leaves (0, 2, 3, 7) load as they are.
- ``past_present_share_buffer`` must be false: the exported attention concatenates past and new keys, so
  ``present`` is a new, longer tensor each step, not an in-place buffer of ``max_length``.
- ``position_ids`` is listed only when the graph has that input (Gemma3 exports have none).
- KV head count and head_size are read from the graph's KV inputs, not from the config.

``onnxruntime-genai`` is optional (extra ``genai``); writing the config does not need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import SubFitError, UnsupportedModelError
from .model_config import FIELD_ALIASES, config_value, read_config, text_config
from .names import GENAI_CONFIG_FILE, KV, ONNX_FILE
from .onnx_files import export_paths

# Model types onnxruntime-genai knows by name; any other decoder-only export runs as "llama" (the generic
# decoder-only path: it only uses the type to pick the model class, the graph does the rest).
GENAI_TYPES = {"llama", "mistral", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "granite",
               "olmo", "chatglm", "nemotron", "smollm3", "gpt2"}


def _first(cfg: dict[str, Any], field: str) -> Any:
    """A config value (a ``model_config`` field or a plain key), preferring the true values a SubFit rewrite keeps
    under ``subfit.original_config`` (it rewrites num_attention_heads/hidden_size for Optimum's empty-past guess
    on Phi-3-like models)."""
    original = (cfg.get("subfit") or {}).get("original_config") or {}
    for source in (original, cfg):
        if field in FIELD_ALIASES:
            value = config_value(source, field)
        else:
            value = source.get(field) if source.get(field) is not None else text_config(source).get(field)
        if value is not None:
            return value
    return None


def _model_signature(model_dir: Path, config: dict[str, Any]) -> Any:
    """The graph's signature, read from a weight-free session-less parse of the inputs/outputs."""
    import onnx

    from .evaluation.signature import read_signature, specs_from_onnx

    model = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    return read_signature(specs_from_onnx(model.graph.input), specs_from_onnx(model.graph.output), config)


def genai_config(model_dir: str | os.PathLike, *, context_length: int | None = None,
                 provider: str = "cpu", share_buffer: bool = False) -> dict[str, Any]:
    """The ``genai_config.json`` content for an Optimum export (dense or rewritten), as a dict.

    ``share_buffer``: the graph's attention updates a static cache in place (GroupQueryAttention, the fused
    export's), so onnxruntime-genai may hand it past and present as one buffer."""
    root, _ = export_paths(model_dir)
    cfg = read_config(root, required=True)
    sig = _model_signature(root, cfg)
    if not sig.has_kv:
        raise UnsupportedModelError(
            "onnxruntime-genai needs KV-cache inputs and this export has none (every attention removed); "
            "use subfit_onnx.runtime.load_for_generation instead")
    shape = sig.uniform_kv_shape()
    if shape is None:
        raise UnsupportedModelError("KV layers differ in head count or head_dim; onnxruntime-genai needs one shape")
    heads, head_size = shape
    model_type = cfg.get("model_type", "llama")
    eos = _first(cfg, "eos_token_id")
    gen_path = root / "generation_config.json"
    if gen_path.is_file():  # generation_config.json holds the chat models' real stop tokens
        eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id", eos)
    if eos is None:
        raise SubFitError(f"{root}/config.json has no eos_token_id; onnxruntime-genai needs one")
    pad = _first(cfg, "pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    ctx = context_length or _first(cfg, "max_positions") or 2048
    inputs = {"input_ids": sig.input_ids, "past_key_names": KV.template("past", "key"),
              "past_value_names": KV.template("past", "value")}
    if sig.attention_mask:
        inputs["attention_mask"] = sig.attention_mask
    if sig.position_ids:
        inputs["position_ids"] = sig.position_ids
    providers = [] if provider == "cpu" else [{provider: {}}]
    return {
        "model": {
            "type": model_type if model_type in GENAI_TYPES else "llama",
            "bos_token_id": _first(cfg, "bos_token_id") if _first(cfg, "bos_token_id") is not None else pad,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": _first(cfg, "vocab_size"),
            "context_length": int(ctx),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": ONNX_FILE,
                "head_size": head_size,
                "hidden_size": _first(cfg, "hidden_size"),
                "num_attention_heads": _first(cfg, "num_attention_heads"),
                "num_key_value_heads": heads,
                # 0.18 takes the KV layers from the session inputs matching the name templates; this count is
                # not used to build names (checked: 1, 2, 4 and 8 all run a graph with layers 0, 2, 3, 7)
                "num_hidden_layers": len(sig.kv),
                "inputs": inputs,
                "outputs": {"logits": sig.logits, "present_key_names": KV.template("present", "key"),
                            "present_value_names": KV.template("present", "value")},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(ctx), "min_length": 0,
            "past_present_share_buffer": share_buffer, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
        },
    }


def write_rewritten_genai_config(source_dir: Path, out: Path, kv_layers: list[int]) -> Path:
    """The model builder's own genai_config.json for its rewritten graph: only ``num_hidden_layers`` changes.

    onnxruntime-genai 0.18 finds the KV layers from the session's inputs through the ``%d`` name templates
    (checked: 5, 25, 30 and 40 all run SmolLM2 with 24 KV layers, and ``past_present_share_buffer`` works with
    gaps), so the count is kept truthful rather than load-bearing; every other field describes the tokenizer,
    the search and the tensor names, which a rewrite does not change.
    """
    from .model_config import read_genai_config

    content = read_genai_config(source_dir) or {}
    content.setdefault("model", {}).setdefault("decoder", {})["num_hidden_layers"] = len(kv_layers)
    path = out / GENAI_CONFIG_FILE
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
    return path


def write_genai_config(model_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``genai_config.json`` into the export folder (overwriting one there) and return its path."""
    content = genai_config(model_dir, **kwargs)
    path = Path(model_dir) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path
