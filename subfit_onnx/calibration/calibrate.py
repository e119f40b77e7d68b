"""Two passes from a model and calibration tokens to a plan.

Pass 1 runs the dense model layer by layer and scores every unit. Pass 2 runs layer by layer again on the
*compressed* upstream: each unit is re-scored on what it now sees, decided (``SequentialSelector``), and, when it
goes, fitted on those same statistics and swapped for its bypass before the next unit is measured. Cost: about
one forward for pass 1 and 1-2 for pass 2, whatever the number of removals.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..architectures import UNIT_KINDS, UnitKind
from ..config import SubFitConfig
from ..plan import ModelIdentity, Plan, RemovedUnit, bypass_spec, bypass_tensors, sparsity_report
from ..progress import ProgressFactory, silent
from ..reference import UnitSwap, install_bypass
from ..torch_model import model_identity, unit_param_table
from .fitting import Bypass
from .scoring import UnitAssessment, assess, score
from .selection import SequentialSelector, UnitKey, check_reachable, target_params
from .stats import UnitStats
from .torch_backend import DenseTargets, TorchLayerRunner

VERSION_PACKAGES = ("subfit-onnx", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnx-ir", "onnxruntime")


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class DensePass:
    """What pass 1 learns on the dense model; reusable across configs with the same weighting/rank/ridge."""

    assessments: dict[UnitKey, UnitAssessment] = field(default_factory=dict)
    block_influence: list[float] = field(default_factory=list)


@dataclass
class CalibrationResult:
    plan: Plan
    tensors: dict[str, np.ndarray]
    dense: DensePass
    dense_scores: dict[UnitKey, float]


def _zero_bypass(hidden: int) -> Bypass:
    return Bypass(bias=np.zeros(hidden))


class Calibrator:
    """Holds the runner, the selector and the growing list of removals for one calibration."""

    def __init__(self, model: nn.Module, tokens: np.ndarray, config: SubFitConfig,
                 progress: ProgressFactory = silent, workdir: str | None = None) -> None:
        self.model = model
        self.config = config
        self.progress = progress
        self.identity: ModelIdentity = model_identity(model)
        self.params = unit_param_table(model)
        self.block_params = sum(self.params.values())
        self.target = target_params(self.block_params, config.sparsity)
        check_reachable(self.params, self.target, config.sparsity)
        self.runner = TorchLayerRunner(model, tokens, config.batch_size, workdir, progress)
        self.swaps: list[UnitSwap] = []
        self.removed: list[RemovedUnit] = []
        self.tensors: dict[str, np.ndarray] = {}

    def _assess(self, kind: UnitKind, stats: UnitStats) -> UnitAssessment:
        return assess(stats, self.config.rank_for(kind, self.identity.hidden_size), self.config.ridge)

    def dense_pass(self) -> DensePass:
        """Pass 1: every unit assessed on the dense model, and ShortGPT's block influence per layer."""
        dense = DensePass()
        n = len(self.runner.layers)
        for i in range(n):
            stats = self.runner.sweep(i, UNIT_KINDS, self.config.weighting, f"scoring layer {i + 1}/{n}")
            for kind in UNIT_KINDS:
                dense.assessments[(i, kind)] = self._assess(kind, stats[kind])
            dense.block_influence.append(_block_influence(self.runner.store.current, self.runner.store.next))
            self.runner.store.advance()
        self.runner.store.restore()
        return dense

    def scores(self, dense: DensePass) -> dict[UnitKey, float]:
        return {k: score(a, self.config.score, self.params[k]) for k, a in dense.assessments.items()}

    def _remove(self, i: int, kind: UnitKind, stats: UnitStats, unit_score: float) -> None:
        a = self._assess(kind, stats)
        bypass = a.bypass if self.config.bypass else _zero_bypass(self.identity.hidden_size)
        fit_rel = a.fit_relative if self.config.bypass else 1.0
        key = f"layers.{i}.{kind}"
        self.swaps.append(install_bypass(self.model, self.runner.family, i, kind, bypass))
        self.tensors.update(bypass_tensors(key, bypass))
        self.removed.append(RemovedUnit(
            layer=i, kind=kind, score=unit_score, fit_error=fit_rel,
            stream_error=a.stream_relative if self.config.bypass else fit_rel * stats.y_energy / max(stats.stream_energy, 1e-30),
            params_removed=self.params[(i, kind)], bypass=bypass_spec(key, bypass),
        ))

    def compress_pass(self, prior: dict[UnitKey, float]) -> None:
        """Pass 2: depth order on the compressed upstream; decide, fit and swap each unit in turn."""
        selector = SequentialSelector(prior, self.params, self.target, rescore=self.config.schedule == "sequential")
        dense = DenseTargets(self.runner) if self.config.target == "dense_stream" else None
        try:
            self._compress_layers(selector, dense)
        finally:
            if dense is not None:
                dense.close()

    def _compress_layers(self, selector: SequentialSelector, dense: DenseTargets | None) -> None:
        n = len(self.runner.layers)
        w = self.config.weighting
        for i in range(n):
            if dense is not None:
                self.runner.dense_sweep(i, dense, f"dense layer {i + 1}/{n}")
            stats = self.runner.sweep(i, UNIT_KINDS, w, f"fitting layer {i + 1}/{n}", dense)
            changed = False
            for kind in UNIT_KINDS:
                if kind == "mlp" and changed:  # the FFN now sees the attention's bypass: measure again
                    stats = self.runner.sweep(i, ("mlp",), w, f"fitting layer {i + 1}/{n} (FFN)", dense)
                    changed = False
                fresh = score(self._assess(kind, stats[kind]), self.config.score, self.params[(i, kind)])
                if selector.decide((i, kind), fresh):
                    self._remove(i, kind, stats[kind], fresh)
                    changed = True
            if changed:  # the layer's outputs must come from the bypassed units
                self.runner.sweep(i, (), w, f"fitting layer {i + 1}/{n} (outputs)")
            self.runner.store.advance()
            if dense is not None:
                dense.store.advance()

    def plan(self, calibration_info: dict[str, Any]) -> Plan:
        return Plan(
            model=self.identity,
            removed=sorted(self.removed, key=lambda u: (u.layer, UNIT_KINDS.index(u.kind))),
            sparsity=sparsity_report(self.removed, self.block_params, self.config.sparsity),
            method=self.config.model_dump(exclude={"calibration", "num_samples", "seq_len", "batch_size"}),
            calibration=calibration_info,
            versions=package_versions(),
        )

    def restore_model(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()

    def close(self) -> None:
        self.runner.close()


def _block_influence(before: np.ndarray, after: np.ndarray) -> float:
    """ShortGPT's BI: 1 - mean cosine between a layer's input and output hidden states."""
    total, count = 0.0, 0
    for s in range(0, before.shape[0], 8):
        a = np.asarray(before[s : s + 8], dtype=np.float64)
        b = np.asarray(after[s : s + 8], dtype=np.float64)
        cos = np.einsum("bsd,bsd->bs", a, b) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        total += float(cos.sum())
        count += cos.size
    return 1.0 - total / count


def calibrate_model(model: nn.Module, tokens: np.ndarray, config: SubFitConfig,
                    progress: ProgressFactory = silent, calibration_info: dict[str, Any] | None = None,
                    keep_compressed: bool = False, workdir: str | None = None,
                    dense: DensePass | None = None) -> CalibrationResult:
    """Score, select and fit; the model is restored afterwards unless ``keep_compressed``.

    ``dense`` reuses a previous pass 1 on the same tokens (benchmarks sweep several configs that way).
    """
    cal = Calibrator(model, tokens, config, progress, workdir)
    try:
        dense = dense or cal.dense_pass()
        prior = cal.scores(dense)
        cal.compress_pass(prior)
        info = {"num_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), **(calibration_info or {})}
        plan = cal.plan(info)
        if not keep_compressed:
            cal.restore_model()
        return CalibrationResult(plan=plan, tensors=cal.tensors, dense=dense, dense_scores=prior)
    except BaseException:
        cal.restore_model()
        raise
    finally:
        cal.close()
