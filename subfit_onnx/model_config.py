"""A model's config.json: read once, its text part, and its fields under one set of names.

SubFit reads the same few facts (layers, hidden size, heads, KV heads, head size, vocabulary) from config.json
dicts and from transformers config objects. Their keys differ by family (GPT-2's ``n_embd``) and nesting (a
multimodal config keeps them in ``text_config``). Optimum's ``NormalizedConfigManager`` knows the aliases of the
model types it lists and is asked first; ``FIELD_ALIASES`` covers the rest (``head_dim``, context length, and types
Optimum does not list, such as gemma2). Importing this module loads neither torch nor transformers.

An onnxruntime-genai model-builder folder ships no config.json, only ``genai_config.json``; ``read_config``
then maps that over (``config_from_genai``), so every reader gets the same facts whichever file holds them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import SubFitError
from .names import CONFIG_FILE, GENAI_CONFIG_FILE

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions"),
}
_OPTIMUM_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


def read_config(folder: str | Path, *, required: bool = False) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict, else the one ``genai_config.json`` describes (a model-builder folder);
    None when there is neither (unless ``required``). Bad files: one line."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        genai = read_genai_config(folder)
        if genai is not None:
            return config_from_genai(genai, Path(folder) / GENAI_CONFIG_FILE)
        if required:
            raise SubFitError(f"{Path(folder)} has no {CONFIG_FILE}")
        return None
    return _read_json(path)


def read_genai_config(folder: str | Path) -> dict[str, Any] | None:
    """``folder/genai_config.json`` (onnxruntime-genai's) as a dict; None when there is none."""
    path = Path(folder) / GENAI_CONFIG_FILE
    return _read_json(path) if path.is_file() else None


# genai_config's model.type -> transformers' model_type, where they differ
_GENAI_MODEL_TYPES = {"gemma3": "gemma3_text"}


def config_from_genai(genai: Mapping[str, Any], where: Path | str = GENAI_CONFIG_FILE) -> dict[str, Any]:
    """The config.json facts a model-builder ``genai_config.json`` holds: model type, sizes, heads, vocabulary and
    special tokens. What transformers would default (RoPE, norms) is left out: the graph holds it. Optimum's
    ``ORTModelForCausalLM`` runs the graph with this much, and SubFit writes it as the output's config.json."""
    model = genai.get("model") or {}
    decoder = model.get("decoder") or {}
    try:
        config = {
            "model_type": _GENAI_MODEL_TYPES.get(model["type"], model["type"]),
            "hidden_size": int(decoder["hidden_size"]),
            "num_attention_heads": int(decoder["num_attention_heads"]),
            "num_key_value_heads": int(decoder["num_key_value_heads"]),
            "head_dim": int(decoder["head_size"]),
            "num_hidden_layers": int(decoder["num_hidden_layers"]),
            "vocab_size": int(model["vocab_size"]),
            "max_position_embeddings": int(model.get("context_length") or 2048),
            "use_cache": True,
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SubFitError(f"{where} lacks {exc} needed to describe the model") from None
    config.update({k: model[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model})
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SubFitError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SubFitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise SubFitError(f"{path} does not hold a JSON object")
    return data


def write_config(folder: str | Path, config: Mapping[str, Any]) -> None:
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def text_config(config: Any) -> Any:
    """The part that describes the language model: ``text_config`` of a multimodal config, else the config."""
    if isinstance(config, Mapping):
        inner = config.get("text_config")
        return inner if isinstance(inner, Mapping) else config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_type(config: Any) -> str | None:
    value = _get(text_config(config), "model_type") or _get(config, "model_type")
    return str(value) if value else None


def _optimum_value(config: Any, field: str) -> Any:
    """The field as Optimum's normalized config for this model type reads it; None when it does not know it."""
    from optimum.utils import NormalizedConfigManager

    kind = _get(config, "model_type")
    try:
        normalizer = NormalizedConfigManager.get_normalized_config_class(str(kind))
    except (KeyError, ValueError):
        return None
    view = SimpleNamespace(**config) if isinstance(config, Mapping) else config
    try:
        return getattr(normalizer(view), field)
    except AttributeError:
        return None


def config_value(config: Any, field: str) -> Any:
    """A field of ``FIELD_ALIASES`` from a config.json dict or a transformers config; None when absent.

    The text part is asked first, then the top level, so a multimodal config answers for its language model.
    """
    sources = [text_config(config)]
    if sources[0] is not config:
        sources.append(config)
    for source in sources:
        value = _optimum_value(source, field) if field in _OPTIMUM_FIELDS else None
        if value is None:
            value = next((v for key in FIELD_ALIASES[field] if (v := _get(source, key)) is not None), None)
        if value is not None:
            return value
    return None


def config_key(config: Mapping[str, Any], field: str) -> str:
    """The key that holds ``field`` at the top level of a config.json dict (its canonical name when none does)."""
    return next((key for key in FIELD_ALIASES[field] if key in config), FIELD_ALIASES[field][0])


def kv_shape(config: Any, hidden_size: int | None = None) -> tuple[int | None, int | None]:
    """(KV heads, head size) the way transformers derives them.

    ``num_key_value_heads``, else one KV head per attention head; ``head_dim``, else the hidden size (the
    graph's, when given) split over the attention heads.
    """
    heads = config_value(config, "num_attention_heads")
    kv = config_value(config, "num_key_value_heads") or heads
    hidden = hidden_size if hidden_size is not None else config_value(config, "hidden_size")
    head_dim = config_value(config, "head_dim")
    if head_dim is None and hidden and heads:
        head_dim = int(hidden) // int(heads)
    return (int(kv) if kv is not None else None), (int(head_dim) if head_dim is not None else None)
