"""Two passes from a model and calibration tokens to a plan.

Pass 1 runs the dense model layer by layer and scores every unit. Pass 2 runs layer by layer again on the
*compressed* upstream: each unit is re-scored on what it now sees, decided (``SequentialSelector``), and, when it
goes, fitted on those same statistics and swapped for its bypass before the next unit is measured. Cost: about
one forward for pass 1 and 1-2 for pass 2 (twice with ``weighting="auto"``), whatever the number of removals.
Between them, ``score="end_to_end"`` (the default) probes every unit alone on the last row, which pass 1 does not fit
on (``probe``): about ``L / 64`` forwards for ``L`` layers.
Pass 1's scores are only priors for the units pass 2 has not reached yet, so ``prior_samples`` runs it on a
subset of the sequences (half by default); pass 2 stops fitting at the layer where the budget is met.
With ``ffn_bypass`` neurons or auto, pass 2 also fits each removed gated FFN with some of its own neurons until
one takes them; the layers from there to the last removed FFN run once more, to refit the FFNs after it on an
upstream with neurons (``Calibrator.refit_ffns_with_neurons``).
"""

from __future__ import annotations

import copy
import importlib.metadata as md
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..architectures import UNIT_KINDS, UnitKind
from ..bypass import Bypass
from ..config import SubFitConfig, TokenWeighting
from ..errors import SubFitError
from ..gated_ffn import GatedFFN, equal_cost_shape
from ..identity import ModelIdentity
from ..names import unit_key
from ..plan import Plan, RemovedUnit, bypass_spec, bypass_tensors, sparsity_report
from ..progress import ProgressFactory, silent
from .budget import UNITS, Budget, params_budget
from .neuron_fit import NeuronEnergy, StoredRows, choose_features, feature_stats, fit_neurons
from .probe import EndToEndProbe
from .runner import LayerRunner
from .scoring import UnitAssessment, assess, per_saving, score
from .selection import SequentialSelector, UnitKey, check_reachable, target_params
from .stats import UnitStats
from .weighting_choice import (
    CANDIDATE_WEIGHTINGS,
    best_weighting,
    dense_held_out,
    held_out_distance,
    held_out_rows,
    run_rows_on,
)

if TYPE_CHECKING:  # torch stays out of run_calibration's imports: the ONNX Runtime backend has no torch
    from torch import nn

NeuronTap = tuple[GatedFFN, NeuronEnergy]  # a gated FFN and its neurons' energies, summed as its layer runs
PROBED_WEIGHTING: TokenWeighting = "uniform"  # whose bypasses the end-to-end probes try (``probe_units``)
LOCAL_SCORE = "stream_error"  # what pass 2 measures again to update an end-to-end score (``EndToEndPrior``)
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
    """What pass 1 learns on the dense model; reusable across configs with the same weighting/rank/ridge.

    ``assessments`` are under ``weighting``, the one pass 2 uses. With ``weighting="auto"`` pass 1 also keeps
    every candidate's assessments, the first held-out row and the dense last stream of the held-out rows; after
    the check (``weighting_choice``) ``weighting`` is the candidate whose pass 2 won it, and ``held_out`` says how
    far each candidate's compressed model left the held-out rows' last stream from the dense one.
    """

    assessments: dict[UnitKey, UnitAssessment] = field(default_factory=dict)
    block_influence: list[float] = field(default_factory=list)
    weighting: TokenWeighting = "stream"
    held_out: dict[str, float] = field(default_factory=dict)
    candidates: dict[TokenWeighting, dict[UnitKey, UnitAssessment]] = field(default_factory=dict)
    held_start: int | None = None
    dense_final: np.ndarray | None = None
    end_to_end: dict[UnitKey, float] = field(default_factory=dict)  # ``probe`` distances, shared by every weighting

    def by_weighting(self) -> dict[TokenWeighting, dict[UnitKey, UnitAssessment]]:
        """Pass 1's assessments under every weighting it ran: each candidate's, or the one weighting's."""
        return self.candidates or {self.weighting: self.assessments}


@dataclass
class EndToEndPrior:
    """``score="end_to_end"`` under one weighting: each unit's probe distance, and its local pass-1 damage.

    Pass 2 sees a unit on the compressed upstream, where only its local damage can be measured again; the fresh
    end-to-end estimate scales the probe distance by how much the local damage has grown since pass 1.
    """

    distance: dict[UnitKey, float]
    local: dict[UnitKey, float]

    def estimate(self, key: UnitKey, local_now: float) -> float:
        before = self.local[key]
        return self.distance[key] * (local_now / before if before > 0 else 1.0)


@dataclass
class CalibrationResult:
    plan: Plan
    tensors: dict[str, np.ndarray]
    dense: DensePass


def _zero_bypass(hidden: int) -> Bypass:
    return Bypass(bias=np.zeros(hidden))


class Calibrator:
    """Holds the runner, the selector and the growing list of removals for one calibration.

    The runner is the backend (PyTorch here, ONNX Runtime in ``onnx_backend``); everything else is shared.
    """

    def __init__(self, runner: LayerRunner, config: SubFitConfig, budget: Budget | None = None) -> None:
        self.config = config
        self.runner = runner
        self.identity: ModelIdentity = runner.identity
        self.params = runner.unit_params
        self.block_params = sum(self.params.values())
        if budget is None:
            check_reachable(self.params, target_params(self.block_params, config.sparsity), config.sparsity)
            budget = params_budget(self.params, config.sparsity)
        else:
            budget.check_reachable(self.params)
        self.budget = budget
        self.swaps: list[Any] = []
        self.installed: list[tuple[int, UnitKind, Bypass]] = []
        self.removed: list[RemovedUnit] = []
        self.tensors: dict[str, np.ndarray] = {}
        # each removed unit's statistics over every row, held-out ones included (checked runs only; (d+1)^2
        # float64 twice per unit)
        self.all_rows: dict[UnitKey, UnitStats] = {}
        self.end_to_end: dict[TokenWeighting, EndToEndPrior] = {}
        # the first FFN that took neurons in pass 2 (its fit, for after pass 2); the refit starts after it
        self.first_neurons: tuple[int, UnitStats, UnitAssessment] | None = None
        if config.ffn_bypass == "neurons" and not runner.reads_ffn_neurons:
            raise SubFitError(f"ffn_bypass 'neurons' needs a calibration backend that reads FFN weights; the "
                              f"{runner.backend} backend fits linear FFN bypasses only (auto falls back to them)")
        self.refits_neurons = config.refits_ffn_neurons(runner.reads_ffn_neurons)

    def _assess(self, kind: UnitKind, stats: UnitStats) -> UnitAssessment:
        return assess(stats, self.config.rank_for(kind, self.identity.hidden_size), self.config.ridge, self.runner.linalg)

    def dense_pass(self) -> DensePass:
        """Pass 1: every unit assessed on the dense model, and ShortGPT's block influence per layer.

        With ``weighting="auto"`` every unit is assessed under each candidate weighting and the last calibration
        rows are kept out of those statistics; pass 2 then runs once per candidate (``compress_checked``).
        """
        total = self.runner.store.shape[0]
        auto = self.config.weighting == "auto"
        held = held_out_rows(total) if auto else 0
        weightings = CANDIDATE_WEIGHTINGS if held else (CANDIDATE_WEIGHTINGS[0] if auto else self.config.weighting,)
        candidates: dict[TokenWeighting, dict[UnitKey, UnitAssessment]] = {w: {} for w in weightings}
        dense = DensePass(weighting=weightings[0], assessments=candidates[weightings[0]])
        rows = self.config.prior_rows(total)
        self.runner.stat_rows = total - held
        try:
            with self.runner.scoring_only(rows):
                self._dense_layers(dense, candidates, min(rows, total - held))
            dense_final = np.array(self.runner.store.current[total - held:]) if held and rows >= total else None
        finally:
            self.runner.stat_rows = None
        if held:
            dense.candidates, dense.held_start = candidates, total - held
            # pass 1 ran on fewer rows than the held-out ones: run them dense now
            dense.dense_final = dense_final if dense_final is not None else dense_held_out(self.runner, total - held)
        self.runner.store.restore()
        return dense

    def _dense_layers(self, dense: DensePass, candidates: dict[TokenWeighting, dict[UnitKey, UnitAssessment]],
                      rows: int) -> None:
        n = self.runner.num_layers
        for i in range(n):
            stats = self.runner.sweep(i, UNIT_KINDS, tuple(candidates), f"scoring layer {i + 1}/{n}")
            for kind in UNIT_KINDS:
                for w, assessments in candidates.items():
                    assessments[(i, kind)] = self._assess(kind, stats[kind][w])
            dense.block_influence.append(_block_influence(self.runner.store.current[:rows], self.runner.store.next[:rows]))
            self.runner.store.advance()

    def scores(self, assessments: dict[UnitKey, UnitAssessment], weighting: TokenWeighting) -> dict[UnitKey, float]:
        prior = self.end_to_end.get(weighting)
        if prior is not None:
            return {k: per_saving(prior.distance[k], self.budget.savings[k]) for k in assessments}
        return {k: score(a, self.config.score, self.budget.savings[k]) for k, a in assessments.items()}

    def use_end_to_end(self, dense: DensePass) -> None:
        """Score by the probes' distances (``score="end_to_end"``) under every weighting pass 1 ran; each scales
        them by the growth of its own local damage."""
        for w, assessed in dense.by_weighting().items():
            self.end_to_end[w] = EndToEndPrior(dense.end_to_end, {k: a.damage(LOCAL_SCORE) for k, a in assessed.items()})

    def _remove(self, i: int, kind: UnitKind, stats: UnitStats, a: UnitAssessment, unit_score: float,
                tap: NeuronTap | None = None) -> Bypass:
        if tap is not None:  # before the linear bypass overwrites the layer's stored outputs
            fit = self._with_neurons(*tap, stats, a)
            if fit is not a:
                self.first_neurons = (i, stats, fit)
                self._snapshot_outputs_with(fit.bypass)
        bypass = a.bypass if self.config.bypass else _zero_bypass(self.identity.hidden_size)
        self.swaps.append(self.runner.install_bypass(i, kind, bypass))
        self.installed.append((i, kind, bypass))
        if self.config.bypass and stats.held_out is not None:  # a checked pass 2: every row's sums, for a refit
            self.all_rows[(i, kind)] = stats.with_held_out()
        self.removed.append(self._removed_unit(i, kind, stats, a, unit_score, bypass))
        return bypass

    @property
    def _neuron_snapshot(self) -> str:
        return f"first-neurons-{id(self)}"  # one per calibrator: the weighting check runs several on one store

    def _neuron_tap(self, i: int, weighting: TokenWeighting) -> NeuronTap | None:
        """Layer ``i``'s gated FFN and an energy sum for its sweep to fill, while pass 2 fits FFNs with neurons."""
        if not self.refits_neurons or self.first_neurons is not None:
            return None
        ffn = self.runner.gated_ffn(i)  # None when not gated (GPT-2): no neurons to fit with
        return None if ffn is None else (ffn, NeuronEnergy(weighting))

    def _snapshot_outputs_with(self, bypass: Bypass) -> None:
        """Keep the layer's outputs with ``bypass`` as its FFN, for the refit to start from; the store is as before."""
        store = self.runner.store
        self._outputs_with_mlp_bypass(bypass)
        store.advance()
        store.snapshot(self._neuron_snapshot)
        store.advance()

    def _ffn_index(self, i: int) -> int:
        return next(j for j, (layer, kind, _) in enumerate(self.installed) if (layer, kind) == (i, "mlp"))

    def _replace_ffn_bypass(self, i: int, stats: UnitStats, a: UnitAssessment) -> None:
        """Record ``a`` as removed FFN ``i``'s bypass (its statistics: ``stats``), in place of the linear one."""
        self.installed[self._ffn_index(i)] = (i, "mlp", a.bypass)
        k = next(k for k, u in enumerate(self.removed) if (u.layer, u.kind) == (i, "mlp"))
        key = unit_key(i, "mlp")
        self.tensors = {name: t for name, t in self.tensors.items() if not name.startswith(f"{key}.")}
        self.removed[k] = self._removed_unit(i, "mlp", stats, a, self.removed[k].score, a.bypass)

    def refit_ffns_with_neurons(self, weighting: TokenWeighting) -> None:
        """Swap in the first FFN that took neurons in pass 2, then refit every removed gated FFN after it, in depth
        order on an upstream with neurons (``ffn_bypass``; ``neuron_fit``); under ``auto`` an FFN keeps whichever
        of that and its linear refit leaves less fit error.

        The selection stays pass 2's with linear bypasses. Fitting the neurons inside pass 2 and letting later
        units see them changed which units pass 2 removed after them, and that lost more than the neurons gained:
        6.82x against 4.52x on Gemma-3-270m at 37.5% (``benchmarks/neuron_bypass.py``). Leaving every FFN's
        pass-2 fit, each on an upstream of linear bypasses, lost too: 1.941 against 1.810 on SmolLM2 at 25% with
        ``neurons``. Up to the first FFN that takes neurons the upstream is the same either way, so those fits are
        pass 2's; only the layers after it run again, from the store's copy of its outputs.
        """
        if self.first_neurons is None:
            return
        first, first_stats, first_fit = self.first_neurons
        if self.swaps:  # the model is compressed: it computes what the plan says
            j = self._ffn_index(first)
            self.swaps[j].undo()
            self.swaps[j] = self.runner.install_bypass(first, "mlp", first_fit.bypass)
        self._replace_ffn_bypass(first, first_stats, first_fit)
        later = [u.layer for u in self.removed if u.kind == "mlp" and u.layer > first]
        if not later:
            return
        runner, n = self.runner, self.runner.num_layers
        runner.store.restore(self._neuron_snapshot)
        for i in range(first + 1, max(later) + 1):
            if i not in later:
                runner.sweep(i, (), weighting, f"refitting FFNs with neurons, layer {i + 1}/{n}")
            else:
                j = self._ffn_index(i)
                self.swaps[j].undo()  # the FFN itself again, for its inputs and outputs
                ffn = runner.gated_ffn(i)
                energy = NeuronEnergy(weighting)
                stats = runner.sweep(i, ("mlp",), weighting, f"refitting FFNs with neurons, layer {i + 1}/{n}",
                                     neurons=energy if ffn is not None else None)["mlp"]
                a = self._assess("mlp", stats)
                if ffn is not None:
                    a = self._with_neurons(ffn, energy, stats, a)
                self.swaps[j] = runner.install_bypass(i, "mlp", a.bypass)
                self._replace_ffn_bypass(i, stats, a)
                self._outputs_with_mlp_bypass(a.bypass)
            runner.store.advance()

    def _with_neurons(self, ffn: GatedFFN, energy: NeuronEnergy, stats: UnitStats,
                      linear: UnitAssessment) -> UnitAssessment:
        """The FFN's assessment with a bypass that keeps some of its neurons (``energy``: theirs, tapped as the
        FFN ran), or, under ``auto``, ``linear`` when the linear bypass leaves less fit error."""
        runner = self.runner
        mid, x = runner.store.mlp_inputs()
        rows = StoredRows(x, mid, runner.store.next, list(runner.batches()))
        features = choose_features(stats, energy.of(ffn), ffn, *equal_cost_shape(self.identity.hidden_size))
        fstats = feature_stats(features, rows, stats, runner.linalg)
        bypass, err = fit_neurons(features, fstats, self.config.ridge, runner.linalg)
        fit_relative = err / max(fstats.y_energy, 1e-30)
        if self.config.ffn_bypass == "auto" and fit_relative >= linear.fit_relative:
            return linear
        return UnitAssessment(bypass=bypass, fit_relative=fit_relative,
                              stream_relative=err / max(fstats.stream_energy, 1e-30),
                              turn=linear.turn, growth=linear.growth)

    def _removed_unit(self, i: int, kind: UnitKind, stats: UnitStats, a: UnitAssessment, unit_score: float,
                      bypass: Bypass) -> RemovedUnit:
        """The plan's record of a removal, its tensors filed under the unit's key."""
        fit_rel = a.fit_relative if self.config.bypass else 1.0
        key = unit_key(i, kind)
        self.tensors.update(bypass_tensors(key, bypass))
        return RemovedUnit(
            layer=i, kind=kind, score=unit_score, fit_error=fit_rel,
            stream_error=a.stream_relative if self.config.bypass else fit_rel * stats.y_energy / max(stats.stream_energy, 1e-30),
            params_removed=self.params[(i, kind)], bypass=bypass_spec(key, bypass),
        )

    def refit_with_held_out(self) -> None:
        """Fit every removed unit's bypass again on all rows, the check's held-out rows included.

        The check needed rows no fit saw; once it has chosen, those rows are just more calibration data (measured:
        the fits on 7/8 of the rows cost SmolLM2 0.02 and Gemma-3-270m 0.04 of wiki perplexity ratio). Which units
        go and their scores stay as the check saw them; downstream statistics were taken behind the 7/8 fits, a
        difference far below the fits' own error.
        """
        if not self.all_rows:  # an unchecked run, or units dropped with no bypass
            return
        refits: dict[UnitKey, Bypass] = {}
        for n, unit in enumerate(self.removed):
            key = (unit.layer, unit.kind)
            stats = self.all_rows[key]
            a = self._assess(unit.kind, stats)
            self.removed[n] = self._removed_unit(unit.layer, unit.kind, stats, a, unit.score, a.bypass)
            refits[key] = a.bypass
        self.installed = [(i, kind, refits[(i, kind)]) for i, kind, _ in self.installed]

    def selector(self, prior: dict[UnitKey, float]) -> SequentialSelector:
        return SequentialSelector(prior, self.budget.savings, self.budget.target,
                                  rescore=self.config.schedule == "sequential")

    def fresh(self, i: int, kind: UnitKind, stats: UnitStats) -> tuple[UnitAssessment, float]:
        """A unit's assessment on what it sees now, and its score."""
        assessment = self._assess(kind, stats)
        prior = self.end_to_end.get(stats.weighting)
        if prior is not None:
            estimate = prior.estimate((i, kind), assessment.damage(LOCAL_SCORE))
            return assessment, per_saving(estimate, self.budget.savings[(i, kind)])
        return assessment, score(assessment, self.config.score, self.budget.savings[(i, kind)])

    def compress_pass(self, selector: SequentialSelector, weighting: TokenWeighting, label: str = "",
                      start: int = 0) -> None:
        """Pass 2: depth order on the compressed upstream; decide, fit and swap each unit in turn.

        ``start`` > 0 resumes after layers every unit of which ``selector`` has already kept (``shared_prefix``),
        the store holding layer ``start``'s inputs.
        """
        dense = self.runner.dense_targets() if self.config.target == "dense_stream" else None
        if dense is not None and start:
            raise ValueError("dense-stream targets run pass 2 from the first layer")
        try:
            self._compress_layers(selector, dense, weighting, label, start)
        finally:
            if dense is not None:
                dense.close()

    def _compress_layers(self, selector: SequentialSelector, dense: Any, w: TokenWeighting, label: str,
                         start: int) -> None:
        n = self.runner.num_layers
        for i in range(start, n):
            if selector.done:  # nothing later can go: the fit rows need not run on
                self._finish_held_out_rows(i, label)
                return
            if dense is None and self.runner.splits_layers:
                self._compress_layer_in_halves(selector, i, w, label)
            else:
                self._compress_layer(selector, dense, i, w, label)
            self.runner.store.advance()
            if dense is not None:
                dense.store.advance()

    def _compress_layer(self, selector: SequentialSelector, dense: Any, i: int, w: TokenWeighting,
                        label: str) -> None:
        """Pass 2 on layer ``i`` run whole: both units measured in one run, the FFN again if the attention went."""
        n = self.runner.num_layers
        if dense is not None:
            self.runner.dense_sweep(i, dense, f"dense layer {i + 1}/{n}")
        tap = self._neuron_tap(i, w)
        stats = self.runner.sweep(i, UNIT_KINDS, w, f"fitting layer {i + 1}/{n}{label}", dense,
                                  neurons=tap[1] if tap else None)
        changed = False
        for kind in UNIT_KINDS:
            if kind == "mlp" and changed:  # the FFN now sees the attention's bypass: measure again
                tap = self._neuron_tap(i, w)
                stats = self.runner.sweep(i, ("mlp",), w, f"fitting layer {i + 1}/{n} (FFN){label}", dense,
                                          neurons=tap[1] if tap else None)
                changed = False
            assessment, fresh = self.fresh(i, kind, stats[kind])
            if selector.decide((i, kind), fresh):
                bypass = self._remove(i, kind, stats[kind], assessment, fresh, tap if kind == "mlp" else None)
                changed = True
        if changed:  # only when the FFN just went: its bypass, not the FFN, makes the layer's outputs
            self._outputs_with_mlp_bypass(bypass)

    def _compress_layer_in_halves(self, selector: SequentialSelector, i: int, w: TokenWeighting, label: str) -> None:
        """Pass 2 on layer ``i`` as two sub-blocks: the attention is decided before the FFN runs, so a layer that
        loses its attention runs its FFN once, not a second time on the bypassed stream (``splits_layers``).
        Same decisions and fits as ``_compress_layer``, in the same order (bit-identical plans on SmolLM2 and
        Gemma-3-270m at 25%; it saved 4-7 s of 55-60 s PyTorch calibration there, and 3-7 s of 83-86 s on the
        ONNX Runtime backend on SmolLM2)."""
        n, runner = self.runner.num_layers, self.runner
        stats = runner.sweep_attention(i, True, w, f"fitting layer {i + 1}/{n} (attention){label}")
        assessment, fresh = self.fresh(i, "attention", stats["attention"])
        if selector.decide((i, "attention"), fresh):
            self._remove(i, "attention", stats["attention"], assessment, fresh)
            runner.sweep_attention(i, False, w, f"fitting layer {i + 1}/{n} (attention bypass){label}")
        tap = self._neuron_tap(i, w)
        stats = runner.sweep_mlp(i, w, f"fitting layer {i + 1}/{n} (FFN){label}", neurons=tap[1] if tap else None)
        assessment, fresh = self.fresh(i, "mlp", stats["mlp"])
        if selector.decide((i, "mlp"), fresh):
            self._outputs_with_mlp_bypass(self._remove(i, "mlp", stats["mlp"], assessment, fresh, tap))

    def _finish_held_out_rows(self, start_layer: int, label: str) -> None:
        """Run the weighting check's held-out rows (if any) through the layers pass 2 no longer needs.

        Once the budget is met no later unit is decided or fitted, so the fit rows stop here (measured: uniform
        weighting on SmolLM2 at 25% makes its last removal at layer 20 of 30). Only the check needs the last
        stream, and only of the held-out rows.
        """
        if self.runner.stat_rows is not None:
            run_rows_on(self.runner, self.runner.stat_rows, start_layer, "held-out rows layer", label)

    def _outputs_with_mlp_bypass(self, bypass: Bypass) -> None:
        """``mid + bypass(x)`` from the last sweep's stored FFN inputs: the layer's outputs without a re-run.

        Valid because the last sweep of the layer ran with everything upstream of its FFN already final.
        """
        mid, x = self.runner.store.mlp_inputs()
        for rows in self.runner.batches():
            self.runner.store.next[rows] = mid[rows] + bypass.apply(x[rows], dtype=np.float32)

    def plan(self, calibration_info: dict[str, Any]) -> Plan:
        return Plan(
            model=self.identity,
            removed=sorted(self.removed, key=lambda u: (u.layer, UNIT_KINDS.index(u.kind))),
            sparsity=sparsity_report(self.removed, self.block_params, self._sparsity_target()),
            budget=None if self.budget.objective == "params" else self._budget_record(),
            method=self.config.method,
            calibration=calibration_info,
            versions=package_versions(),
        )

    def _sparsity_target(self) -> float:
        """The parameter fraction asked for; under another budget, what that budget removed."""
        if self.budget.objective == "params":
            return self.config.sparsity
        return sum(u.params_removed for u in self.removed) / self.block_params

    def _budget_record(self) -> dict[str, Any]:
        saved = sum(self.budget.savings[(u.layer, u.kind)] for u in self.removed)
        return {"objective": self.budget.objective, "request": self.budget.what, "unit": UNITS[self.budget.objective],
                "target": self.budget.target, "saved": saved, "total": self.budget.total}

    def restore_model(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()
        self.swaps = []

    def reinstall(self) -> None:
        """Swap this calibration's bypasses in again (after another candidate's pass 2 ran on the dense model)."""
        self.swaps = [self.runner.install_bypass(i, kind, bypass) for i, kind, bypass in self.installed]


def compress_checked(first: Calibrator, dense: DensePass) -> Calibrator:
    """Pass 2 once per candidate weighting, the held-out rows in no statistic; keep the candidate whose compressed
    model lands the held-out rows' last stream closest to the dense one (``weighting_choice``). The held-out rows'
    sums ride along apart, so the winner's bypasses are then refitted on every row at no extra forward.

    The model is dense again afterwards; ``dense`` records the distances and the winner.
    """
    runner = first.runner
    runs: dict[TokenWeighting, Calibrator] = {}
    dense.held_out = {}  # a new dict: an earlier run's plan (same pass 1, another budget) keeps its own
    selectors = {w: first.selector(first.scores(assessments, w)) for w, assessments in dense.candidates.items()}
    runner.stat_rows, runner.keep_held_out_stats = dense.held_start, True
    try:
        start = shared_prefix(first, selectors)
        runner.store.snapshot(PARTING)
        for w, selector in selectors.items():
            cal = first if not runs else Calibrator(first.runner, first.config, first.budget)
            cal.end_to_end = first.end_to_end
            runs[w] = cal
            try:
                cal.compress_pass(selector, w, f" ({w}-weighted)", start)
                dense.held_out[w] = held_out_distance(runner, dense.held_start, dense.dense_final)
            finally:
                cal.restore_model()
                runner.store.restore(PARTING)
    finally:
        runner.stat_rows, runner.keep_held_out_stats = None, False
        runner.store.restore()
    dense.weighting = best_weighting(dense.held_out)
    dense.assessments = dense.candidates[dense.weighting]
    winner = runs[dense.weighting]
    winner.refit_with_held_out()
    return winner


PARTING = "parting"  # the store's snapshot of the first layer where the check's candidates part ways


def shared_prefix(cal: Calibrator, selectors: dict[TokenWeighting, SequentialSelector]) -> int:
    """Run once the first layers of pass 2 that every candidate keeps whole; returns the first layer where some
    candidate removes a unit, whose inputs the store then holds.

    Until a candidate removes something, every candidate's pass 2 runs the same dense layers on the same rows and
    differs only in its statistics, which one sweep sums side by side. Each selector has then decided those units
    exactly as in its own pass (measured: SmolLM2 at 25% first removes at layer 7 of 30 under stream weighting).
    Dense-stream fit targets keep their own reference stream from the first layer, so they share nothing.
    """
    if cal.config.target == "dense_stream":
        return 0
    runner, n = cal.runner, cal.runner.num_layers
    for i in range(n):
        stats = runner.sweep(i, UNIT_KINDS, tuple(selectors), f"fitting layer {i + 1}/{n} (every weighting)")
        trial = copy.deepcopy(selectors)
        if any(trial[w].decide((i, kind), cal.fresh(i, kind, stats[kind][w])[1])
               for w in trial for kind in UNIT_KINDS):
            return i
        selectors.update(trial)
        runner.store.advance()
    return n


def probe_units(cal: Calibrator, dense: DensePass) -> None:
    """Pass 1's bypasses tried one at a time end to end (``probe``), once per pass 1 and kept on ``dense``.

    Only one weighting's bypasses are probed (uniform when it is a candidate), and every candidate selects by
    those distances: what a unit's removal does to the output hardly depends on which weighting fitted its
    bypass, and probing each candidate's would double the probes' cost.
    """
    if dense.end_to_end:
        return
    candidates = dense.by_weighting()
    probed = PROBED_WEIGHTING if PROBED_WEIGHTING in candidates else next(iter(candidates))
    zero = _zero_bypass(cal.identity.hidden_size)
    bypasses = {k: a.bypass if cal.config.bypass else zero for k, a in candidates[probed].items()}
    dense.end_to_end = EndToEndProbe(cal.runner).damages(bypasses)


def _block_influence(before: np.ndarray, after: np.ndarray) -> float:
    """ShortGPT's BI: 1 - mean cosine between a layer's input and output hidden states.

    Each token's products are taken in the stream's float32 and the rest in float64: a token's cosine moves by
    about 1e-6 and the mean by 1e-9 (measured), while float64 copies of both streams took 0.9 s of SmolLM2's pass 1.
    """
    total, count = 0.0, 0
    for s in range(0, before.shape[0], 8):
        a, b = np.asarray(before[s : s + 8]), np.asarray(after[s : s + 8])
        dot, aa, bb = (np.einsum("bsd,bsd->bs", x, y).astype(np.float64) for x, y in ((a, b), (a, a), (b, b)))
        cos = dot / np.maximum(np.sqrt(aa * bb), 1e-30)
        total += float(cos.sum())
        count += cos.size
    return 1.0 - total / count


def single_threaded_blas() -> AbstractContextManager[Any]:
    """numpy's BLAS on one thread while calibrating.

    Statistics and fits are many mid-sized numpy BLAS calls between the backend's layer runs. On a few cores
    OpenBLAS's own threads then fight the backend's still-spinning OpenMP/ORT threads: measured on 2 cores, a
    576x576 ``eigh`` right after a torch matmul took 1.5 s with 2 BLAS threads and 0.06 s with one.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_calibration(runner: LayerRunner, config: SubFitConfig, calibration_info: dict[str, Any] | None = None,
                    keep_compressed: bool = False, dense: DensePass | None = None,
                    budget: Budget | None = None) -> CalibrationResult:
    """Score, select and fit with any backend; its model is restored afterwards unless ``keep_compressed``.

    ``budget`` replaces the parameter budget of ``config.sparsity`` (a latency or KV-cache target).
    """
    cal = Calibrator(runner, config, budget)
    try:
        with single_threaded_blas():
            dense = dense or cal.dense_pass()
            if config.score == "end_to_end":
                probe_units(cal, dense)
                cal.use_end_to_end(dense)
            if dense.candidates:
                cal = compress_checked(cal, dense)
                if keep_compressed or cal.refits_neurons:  # the neuron refit runs the compressed model
                    cal.reinstall()
            else:
                cal.compress_pass(cal.selector(cal.scores(dense.assessments, dense.weighting)), dense.weighting)
            cal.refit_ffns_with_neurons(dense.weighting)
        n, seq, _ = runner.store.shape
        info = {"num_samples": int(n), "seq_len": int(seq), "backend": runner.backend, "weighting": dense.weighting,
                **({"held_out_distance": dense.held_out} if dense.held_out else {}), **(calibration_info or {})}
        plan = cal.plan(info)
        if not keep_compressed:
            cal.restore_model()
        return CalibrationResult(plan=plan, tensors=cal.tensors, dense=dense)
    except BaseException:
        cal.restore_model()
        raise


def calibrate_model(model: nn.Module, tokens: np.ndarray, config: SubFitConfig,
                    progress: ProgressFactory = silent, calibration_info: dict[str, Any] | None = None,
                    keep_compressed: bool = False, workdir: str | None = None,
                    dense: DensePass | None = None, budget: Budget | None = None) -> CalibrationResult:
    """Calibrate a transformers model (PyTorch backend).

    ``dense`` reuses a previous pass 1 on the same tokens (benchmarks sweep several configs that way).
    """
    from .torch_backend import TorchLayerRunner

    runner = TorchLayerRunner(model, tokens, config.batch_size, workdir, progress)
    try:
        return run_calibration(runner, config, calibration_info, keep_compressed, dense, budget)
    finally:
        runner.close()
