"""``SubFitConfig``: every knob of calibration, selection and fitting, typed and validated in one place.

Defaults were chosen by measured perplexity on SmolLM2-135M-Instruct (``benchmarks/method_variants.py``;
results in ``benchmarks/results/method_variants.json``), not by taste.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .calibration.scoring import ScoreKind
from .calibration.stats import TokenWeighting

DEFAULT_CALIBRATION_HINT = "a .txt/.jsonl file or folder, or NAME[:CONFIG[:SPLIT[:COLUMN]]] for datasets"


class SubFitConfig(BaseModel):
    """How to compress: target sparsity, calibration data and method choices."""

    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of decoder-block weight parameters to remove")
    calibration: str | None = Field(None, description=DEFAULT_CALIBRATION_HINT)
    num_samples: int = Field(64, ge=1, description="calibration sequences (N)")
    seq_len: int = Field(256, ge=2, description="tokens per calibration sequence (L)")
    batch_size: int = Field(8, ge=1)
    score: ScoreKind = "stream_error"
    schedule: Literal["sequential", "oneshot"] = "sequential"
    weighting: TokenWeighting = "stream"
    attention_rank: int | float | None = Field(
        0.125, description="bypass rank for attention: None = full, int = rank, float in (0,1) = fraction of hidden"
    )
    mlp_rank: int | float | None = Field(None, description="bypass rank for FFNs (same convention)")
    target: Literal["contribution", "dense_stream"] = Field(
        "contribution",
        description="fit each bypass to the unit's own output, or to what restores the dense model's stream there",
    )
    prior_samples: int | float | None = Field(
        None, description="calibration sequences pass 1 scores on (its scores are only priors): None = all, "
        "int = count, float in (0, 1] = fraction of num_samples",
    )
    ridge: float = Field(0.1, ge=0.0, description="ridge strength relative to mean diag(X^T X)")
    bypass: bool = Field(True, description="False drops units with no bypass (the 'submodule drop' baseline)")

    @field_validator("attention_rank", "mlp_rank")
    @classmethod
    def _rank(cls, v: float | None) -> int | float | None:
        if v is not None and (v <= 0 or (isinstance(v, float) and v >= 1.0 and not float(v).is_integer())):
            raise ValueError("rank must be None, a positive int, or a fraction in (0, 1)")
        return v

    @field_validator("prior_samples")
    @classmethod
    def _prior_samples(cls, v: float | None) -> int | float | None:
        if v is not None and (v <= 0 or (isinstance(v, float) and v > 1.0)):
            raise ValueError("prior_samples must be None, a positive int, or a fraction in (0, 1]")
        return v

    def prior_rows(self, rows: int) -> int:
        """How many of ``rows`` calibration sequences pass 1 runs on."""
        v = self.prior_samples
        if v is None:
            return rows
        if isinstance(v, float):
            return max(1, min(rows, round(v * rows)))
        return max(1, min(rows, int(v)))

    def rank_for(self, kind: str, hidden: int) -> int | None:
        value = self.attention_rank if kind == "attention" else self.mlp_rank
        if value is None:
            return None
        if isinstance(value, float) and value < 1.0:
            return max(1, round(value * hidden))
        return int(value)
