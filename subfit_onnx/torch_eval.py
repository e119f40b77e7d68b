"""Perplexity of a PyTorch causal LM over fixed token windows: the yardstick for choosing method defaults."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def torch_perplexity(model: nn.Module, windows: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every window, each scored independently from its first token."""
    nll, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for start in range(0, windows.shape[0], batch_size):
        ids = torch.as_tensor(windows[start : start + batch_size], device=device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(nll / count)
