"""Tiny random decoder LLMs of every supported family, at realistic weight scale.

Norm weights and biases are random (not 1/0) because the ONNX exporter deduplicates identical initializers,
which would merge tensors that the rewrite must tell apart.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 4, 2, 128, 256

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
              "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
                "sliding_window": 4096},
    "qwen2": {"model_type": "qwen2", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
              "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "head_dim": 16,
              "tie_word_embeddings": False},
    "phi3": {"model_type": "phi3", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "pad_token_id": 0},
    "gpt2": {"model_type": "gpt2", "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN,
             "vocab_size": VOCAB, "n_positions": 512},
    "gemma": {"model_type": "gemma", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "head_dim": 16,
               "sliding_window": 4096},
    "gemma3": {"model_type": "gemma3_text", "hidden_size": HIDDEN, "intermediate_size": FFN,
               "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
               "vocab_size": VOCAB, "head_dim": 16, "sliding_window": 4096},
}


def tiny_model(family: str, seed: int = 0, overrides: dict | None = None) -> PreTrainedModel:
    """A random model whose norms and biases are random too, weights scaled like a trained model's."""
    cfg = {**FAMILY_CONFIGS[family], **(overrides or {})}
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager" if model_type.startswith("gemma") else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def last_stream(model: PreTrainedModel, tokens) -> Any:
    """The residual stream entering the final norm: what ``end_to_end.stream_distance`` compares."""
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(torch.as_tensor(tokens))
    handle.remove()
    return seen["h"].numpy()
