"""SubFit's settings, typed and validated in one place.

Two parts that change for different reasons: ``CalibrationData`` says what calibration runs on (which text, how
many sequences of how many tokens, in which batches), ``MethodSettings`` how units are scored, chosen and fitted.
``SubFitConfig`` is both plus the target sparsity, and is what users pass; a plan records only the method part,
since the data part does not change what the plan means. Counts that may be given absolutely or relative to a
whole (bypass ranks, pass-1 sequences) are a ``Portion``, never an int-or-float.

Defaults were chosen by measured perplexity on SmolLM2-135M-Instruct and Gemma-3-270m
(``benchmarks/method_variants.py``; results in ``benchmarks/results/``), not by taste. Units are ranked end to end
(``score="end_to_end"``) under uniform token weighting: on Gemma-3 that loses a quarter less perplexity than the
local score, on SmolLM2 it is within 1.2%, and it costs one pass 2 instead of the two ``weighting="auto"`` runs
(README, "The default: end-to-end scores, uniform weighting").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidSparsityError, SubFitError

ScoreKind = Literal["contribution", "replaceability", "stream_error", "end_to_end"]  # calibration.scoring, .probe
TokenWeighting = Literal["uniform", "stream", "skip_first"]  # see calibration.stats
WeightingSetting = TokenWeighting | Literal["auto"]  # "auto": see calibration.weighting_choice
FfnBypass = Literal["linear", "neurons", "auto"]  # see calibration.neuron_fit
DEFAULT_CALIBRATION = "Salesforce/wikitext:wikitext-2-raw-v1:train"
"""WikiText-2 (train split), the usual calibration set for layer-removal methods; it needs the Hugging Face Hub,
so offline machines pass a local file (``--calibration assets/text/c4_first_half.txt``)."""
DEFAULT_WARN_PPL_RATIO = 2.0
"""Above 2x dense perplexity a model's text is visibly worse (SmolLM2 at 25% lands near 1.85x, at 37.5% near
3.8x), so ``optimize`` warns there; ``--warn-ppl-ratio`` moves the line."""
DEFAULT_HELDOUT_WINDOWS = 16
"""Held-out windows ``optimize`` measures quality on, and whose share of the calibration text calibration leaves
out (``calibration.text.split_stream``); ``calibration_tokens`` uses it too, so benchmarks cut what optimize cuts."""
DEFAULT_CALIBRATION_HINT = "a .txt/.jsonl file or folder, or NAME[:CONFIG[:SPLIT[:COLUMN]]] for datasets"


class Portion(BaseModel):
    """Part of something countable: ``count`` of it, a ``fraction`` of it, or, with neither, all of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> Portion:
        if self.count is not None and self.fraction is not None:
            raise ValueError("give count or fraction, not both")
        return self

    @property
    def is_all(self) -> bool:
        return self.count is None and self.fraction is None

    def of(self, whole: int) -> int | None:
        """How many of ``whole`` (a fraction rounds, and is at least 1); None for all of it."""
        if self.count is not None:
            return self.count
        if self.fraction is not None:
            return max(1, round(self.fraction * whole))
        return None


class CalibrationData(BaseModel):
    """What calibration runs on."""

    model_config = ConfigDict(extra="forbid")

    calibration: str | None = Field(None, description=DEFAULT_CALIBRATION_HINT)
    num_samples: int = Field(64, ge=1, description="calibration sequences (N)")
    seq_len: int = Field(256, ge=2, description="tokens per calibration sequence (L)")
    batch_size: int = Field(8, ge=1)
    heldout_windows: int = Field(
        DEFAULT_HELDOUT_WINDOWS, ge=0, description="windows at the end of the calibration text, which no calibration "
        "window reads, on which optimize measures the held-out perplexity ratio to dense (0: do not measure)")


class MethodSettings(BaseModel):
    """How units are scored, chosen and fitted: what a plan records as its ``method``."""

    model_config = ConfigDict(extra="forbid")

    score: ScoreKind = Field(
        "end_to_end", description="how units are ranked: end_to_end (each unit alone replaced, measured at the last "
        "layer; calibration.probe) or stream_error (each bypass's error where it lands). At the defaults against "
        "stream_error with weighting auto: 2.24 against 2.99 on Gemma-3-270m at 25%, 1.94 against 1.92 on SmolLM2")
    schedule: Literal["sequential", "oneshot"] = "sequential"
    weighting: WeightingSetting = Field(
        "uniform", description="how tokens count in fits and scores; auto runs pass 2 under stream and under "
        "uniform and keeps the one whose compressed model stays closer to the dense one on held-out calibration "
        "rows (needs 16 calibration rows, else stream); under end_to_end it chose uniform on both real models at "
        "25% and 37.5%, at about 1.3x the optimize time")
    attention_rank: Portion = Field(
        Portion(fraction=0.125), description="bypass rank for attention: a count, a fraction of the hidden size, "
        "or neither for full rank")
    mlp_rank: Portion = Field(Portion(), description="bypass rank for FFNs (same convention)")
    target: Literal["unit_output", "dense_stream"] = Field(
        "unit_output",
        description="fit each bypass to the unit's own output, or to what restores the dense model's stream there",
    )
    prior_samples: Portion = Field(
        Portion(fraction=0.5), description="calibration sequences pass 1 scores on (its scores are only priors "
        "for the units pass 2 has not reached): a count, a fraction of num_samples, or neither for all; half "
        "chose the same units as all on SmolLM2 and Gemma-3-270m at 25% and 37.5%")
    ridge: float = Field(
        0.01, ge=0.0, description="ridge strength relative to mean diag(X^T X); 1e-2 beat 0.1 on Gemma-3-270m "
        "(2.99 against 3.27 at 25%, 5.17 against 5.52 at 37.5%) and on SmolLM2 at 37.5% (4.05 against 4.52), and "
        "lost 0.7% on SmolLM2 at 25% (1.915 against 1.901)")
    bypass: bool = Field(True, description="False drops units with no bypass (the 'submodule drop' baseline)")
    ffn_bypass: FfnBypass = Field(
        "auto", description="how a removed gated FFN is bypassed: linear (a d x d map), neurons (a rank d/8 map "
        "plus d/4 of the FFN's own neurons, the same parameter count; calibration.neuron_fit) or auto (per FFN, "
        "the one that leaves less calibration fit error; linear where neurons cannot be read or fitted: a "
        "quantized FFN in an export, target dense_stream, no bypass); which units go does not change with it. "
        "Non-gated FFNs (GPT-2) stay linear. Wiki perplexity ratio, linear / neurons / auto: SmolLM2 1.938 / "
        "1.810 / 1.832 at 25%, 3.847 / 3.154 / 3.474 at 37.5%; Gemma-3-270m 2.241 / 2.249 / 2.129 at 25%, "
        "4.518 / 4.450 / 4.331 at 37.5%")

    @field_validator("attention_rank", "mlp_rank")
    @classmethod
    def _rank(cls, v: Portion) -> Portion:
        if v.fraction is not None and v.fraction >= 1.0:
            raise ValueError("a rank fraction must be below 1 (leave count and fraction unset for full rank)")
        return v

    @model_validator(mode="after")
    def _neurons_fit_unit_outputs(self) -> MethodSettings:
        if self.ffn_bypass == "neurons" and (self.target != "unit_output" or not self.bypass):
            raise ValueError("ffn_bypass 'neurons' needs bypasses fitted to each unit's own output "
                             "(target unit_output, bypass on)")
        return self

    def refits_ffn_neurons(self, backend_reads_neurons: bool) -> bool:
        """Whether removed gated FFNs are refitted with some of their own neurons: always under ``neurons`` (a
        backend that cannot read them refuses it), under ``auto`` wherever the backend can and bypasses fit each
        unit's own output; elsewhere ``auto`` keeps linear bypasses, the only shape available there."""
        if self.ffn_bypass == "auto":
            return backend_reads_neurons and self.target == "unit_output" and self.bypass
        return self.ffn_bypass == "neurons"

    def prior_rows(self, rows: int) -> int:
        """How many of ``rows`` calibration sequences pass 1 runs on."""
        n = self.prior_samples.of(rows)
        return rows if n is None else max(1, min(rows, n))

    def rank_for(self, kind: str, hidden: int) -> int | None:
        """The bypass rank of an attention or FFN unit; None for full rank."""
        return (self.attention_rank if kind == "attention" else self.mlp_rank).of(hidden)


BUDGET_FLAGS = {"target_speedup": "--target-speedup", "kv_budget": "--kv-budget", "max_ppl_ratio": "--max-ppl-ratio"}


class BudgetSettings(BaseModel):
    """What the user asks for when it is not a parameter fraction; at most one is set, and then it replaces
    ``sparsity`` (see ``calibration.budget`` and ``quality_budget``)."""

    model_config = ConfigDict(extra="forbid")

    target_speedup: float | None = Field(None, gt=1.0, description="decode this many times faster at --context")
    kv_budget: float | None = Field(None, ge=0.0, lt=1.0, description="keep at most this fraction of the KV cache")
    max_ppl_ratio: float | None = Field(None, gt=1.0, description="remove as much as possible while the held-out "
                                        "perplexity ratio to dense stays at most this")
    context: int = Field(512, ge=1, description="context length the decode speed is measured at")

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSettings:
        given = [BUDGET_FLAGS[k] for k in BUDGET_FLAGS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        return self

    @property
    def budget(self) -> str | None:
        """The budget field that is set, or None for the parameter budget of ``sparsity``."""
        return next((k for k in BUDGET_FLAGS if getattr(self, k) is not None), None)


class SubFitConfig(MethodSettings, CalibrationData, BudgetSettings):
    """How to compress: target sparsity (or another budget), calibration data and method choices (see the module
    docstring)."""

    sparsity: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of decoder-block weight parameters to remove")

    @property
    def method(self) -> MethodSettings:
        return MethodSettings.model_validate(self.model_dump(include=set(MethodSettings.model_fields)))


def make_config(config: SubFitConfig | None = None, sparsity: float | None = None, **fields: Any) -> SubFitConfig:
    """``config`` with ``sparsity`` and any non-None ``fields`` overriding it; invalid values become one error."""
    updates = {k: v for k, v in {"sparsity": sparsity, **fields}.items() if v is not None}
    try:
        return SubFitConfig.model_validate({**(config.model_dump() if config is not None else {}), **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if where == "sparsity":
            raise InvalidSparsityError(updates.get("sparsity")) from None
        if where in BUDGET_FLAGS:
            raise SubFitError(f"{BUDGET_FLAGS[where]} {updates.get(where)!r}: {err['msg']}") from None
        if not where:  # a model-level rule (one budget at a time)
            raise SubFitError(err["msg"].removeprefix("Value error, ")) from None
        raise SubFitError(f"invalid setting {where}: {err['msg']}") from None


# ---- settings written by earlier versions ------------------------------------------------------------------------
_OLD_TARGETS = {"contribution": "unit_output"}  # renamed: it collided with score="contribution"


def _old_portion(key: str, value: Any) -> Any:
    """Version 1 wrote ranks and prior_samples as None (all), an int (a count) or a float: a fraction, except that
    a whole float of 1 or more was a rank (``2.0``)."""
    if value is None:
        return {}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # already a Portion (or invalid, which validation reports)
    if isinstance(value, int):
        return {"count": value}
    if value < 1.0 or key == "prior_samples":
        return {"fraction": value}
    return {"count": int(value)}


def upgrade_settings_data(data: dict[str, Any]) -> dict[str, Any]:
    """Settings (a plan's method or a subfit_config.json) in the current spelling; current data passes unchanged."""
    out = dict(data)
    for key in ("attention_rank", "mlp_rank", "prior_samples"):
        if key in out:
            out[key] = _old_portion(key, out[key])
    if out.get("target") in _OLD_TARGETS:
        out["target"] = _OLD_TARGETS[out["target"]]
    return out


def read_settings(path: str | Path) -> SubFitConfig:
    """A ``subfit_config.json``, from this version or an earlier one."""
    p = Path(path)
    try:
        return SubFitConfig.model_validate(upgrade_settings_data(json.loads(p.read_text(encoding="utf-8"))))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise SubFitError(f"{p} is not a valid SubFit settings file: {str(exc).splitlines()[0]}") from None
