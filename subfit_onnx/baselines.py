"""Layer-level baselines, expressed as SubFit plans so they go through the same rewrite and evaluation.

- ``layer_drop_plan``: ShortGPT. Whole layers with the lowest Block Influence (1 - cos(h_in, h_out)) go, no bypass.
- ``replaceme_plan``: ReplaceMe. The contiguous block of n layers whose input and output hidden states are closest
  in angle is replaced by one linear map fitted in closed form, here ``h_out = h_in + B(N(h_in))`` with N the
  block's first pre-norm, so it is a SubFit bypass on that layer's attention and zero bypasses elsewhere.
- ``drop_bypasses``: SubFit's own selection with every bypass removed (submodule drop).

They share SubFit's calibration code (layer runner, statistics, token weighting, ridge fit).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .architectures import UNIT_KINDS
from .bypass import Bypass
from .calibration.calibrate import DensePass, package_versions
from .calibration.fitting import fit_bypass
from .calibration.selection import target_params
from .calibration.stats import TokenWeighting, UnitStats
from .calibration.torch_backend import TorchLayerRunner
from .names import unit_key
from .plan import Baseline, Plan, RemovedUnit, bypass_spec, bypass_tensors, sparsity_report
from .torch_model import model_identity, unit_param_table


def _unit(layer: int, kind: str, params: int, bypass: Bypass, fit_error: float = 1.0) -> tuple[RemovedUnit, dict]:
    key = unit_key(layer, kind)
    unit = RemovedUnit(layer=layer, kind=kind, score=0.0, fit_error=fit_error, stream_error=0.0,
                       params_removed=params, bypass=bypass_spec(key, bypass))
    return unit, bypass_tensors(key, bypass)


def _plan(model: nn.Module, units: list[tuple[RemovedUnit, dict]], sparsity: float,
          baseline: Baseline) -> tuple[Plan, dict]:
    params = unit_param_table(model)
    removed = [u for u, _ in units]
    tensors = {k: v for _, t in units for k, v in t.items()}
    plan = Plan(model=model_identity(model), removed=removed, baseline=baseline, versions=package_versions(),
                sparsity=sparsity_report(removed, sum(params.values()), sparsity))
    return plan, tensors


def _layers_needed(model: nn.Module, sparsity: float) -> int:
    params = unit_param_table(model)
    per_layer = params[(0, "attention")] + params[(0, "mlp")]
    return math.ceil(target_params(sum(params.values()), sparsity) / per_layer)


def layer_drop_plan(model: nn.Module, dense: DensePass, sparsity: float) -> tuple[Plan, dict]:
    """ShortGPT: remove the layers of lowest Block Influence (from SubFit's dense pass)."""
    n = _layers_needed(model, sparsity)
    order = np.argsort(dense.block_influence)[:n]
    hidden = model_identity(model).hidden_size
    params = unit_param_table(model)
    units = [_unit(int(i), kind, params[(int(i), kind)], Bypass(bias=np.zeros(hidden)))
             for i in sorted(order) for kind in UNIT_KINDS]
    return _plan(model, units, sparsity, Baseline(name="layer_drop", details={"block_influence": dense.block_influence}))


@torch.no_grad()
def angular_distances(runner: TorchLayerRunner, span: int) -> list[float]:
    """Mean angular distance (arccos cos / pi) between hidden states at boundaries i and i + span."""
    n_layers = len(runner.layers)
    keep = [np.asarray(runner.store.current)]  # boundary 0 ... kept while the window slides
    dist = []
    for i in range(n_layers):
        runner.sweep(i, (), "uniform", f"block distances {i + 1}/{n_layers}")
        runner.store.advance()
        keep.append(np.array(runner.store.current))
        if len(keep) > span + 1:
            keep.pop(0)
        if len(keep) == span + 1:
            a, b = keep[0].astype(np.float64), keep[-1].astype(np.float64)
            cos = np.einsum("bsd,bsd->bs", a, b) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
            dist.append(float(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi)))
    runner.store.restore()
    return dist  # dist[i]: block starting at layer i


@torch.no_grad()
def replaceme_plan(model: nn.Module, tokens: np.ndarray, sparsity: float, weighting: TokenWeighting = "stream",
                   ridge: float = 1e-4, batch_size: int = 8) -> tuple[Plan, dict]:
    """ReplaceMe: the most redundant contiguous block becomes one fitted linear map.

    The last layer is never part of the block (its output feeds the final norm, where the angle means little).
    """
    n = _layers_needed(model, sparsity)
    runner = TorchLayerRunner(model, tokens, batch_size)
    try:
        dist = angular_distances(runner, n)
        candidates = dist[: len(runner.layers) - n]  # blocks that end before the last layer
        start = int(np.argmin(candidates))
        for i in range(start):
            runner.sweep(i, (), weighting, f"ReplaceMe upstream {i + 1}/{start}")
            runner.store.advance()
        h_start = np.array(runner.store.current)
        runner.sweep(start, (), weighting, f"ReplaceMe block 1/{n}")
        for i in range(start + 1, start + n):
            runner.store.advance()
            runner.sweep(i, (), weighting, f"ReplaceMe block {i - start + 1}/{n}")
        runner.store.advance()
        h_end = np.asarray(runner.store.current)
        hidden = h_start.shape[-1]
        block = UnitStats(hidden, hidden, weighting)
        family = runner.family
        layer = runner.layers[start]
        norm = getattr(layer, family.attention.pre_norm)
        for rows in runner.batches():
            h = torch.from_numpy(h_start[rows]).to(runner.device, runner.dtype)
            x = norm(h).double().cpu().numpy()
            block.update(x, h_end[rows].astype(np.float64) - h_start[rows], h_start[rows])
    finally:
        runner.close()
    bypass, err = fit_bypass(block, rank=None, ridge=ridge)
    params = unit_param_table(model)
    units = [_unit(start, "attention", params[(start, "attention")], bypass, err / max(block.y_energy, 1e-30))]
    units += [_unit(start, "mlp", params[(start, "mlp")], Bypass(bias=np.zeros(hidden)))]
    units += [_unit(i, kind, params[(i, kind)], Bypass(bias=np.zeros(hidden)))
              for i in range(start + 1, start + n) for kind in UNIT_KINDS]
    return _plan(model, units, sparsity, Baseline(name="replaceme", details={
        "block_start": start, "block_layers": n, "angular_distance": dist}))


def drop_bypasses(plan: Plan, tensors: dict) -> tuple[Plan, dict]:
    """The same units removed with no bypass at all (the plan keeps the method that chose them)."""
    units = []
    for u in plan.removed:
        units.append(_unit(u.layer, u.kind, u.params_removed, Bypass(bias=np.zeros(plan.model.hidden_size))))
    removed = [u for u, _ in units]
    new = plan.model_copy(update={
        "removed": removed,
        "sparsity": sparsity_report(removed, plan.sparsity.block_params, plan.sparsity.target),
        "baseline": Baseline(name="submodule_drop"),
    })
    return new, {k: v for _, t in units for k, v in t.items()}
