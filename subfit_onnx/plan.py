"""The plan: the only bridge between calibration (PyTorch or ONNX Runtime) and the ONNX rewrite.

``subfit_plan.json`` says which units go and why; ``subfit_bypass.safetensors`` holds each bypass's tensors in
float32, named after the unit (``layers.7.mlp.weight``). The rewrite reads only these two files, so it needs no
torch and one calibration can serve several exports (fp32 and fp16) of the same model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from .architectures import UnitKind
from .bypass import Bypass
from .config import MethodSettings, SubFitConfig, upgrade_settings_data
from .errors import SubFitError
from .gated_ffn import ACTIVATIONS
from .identity import ModelIdentity
from .names import BYPASS_FILE, PLAN_FILE, unit_key
from .staging import STAGED, staged_output

PLAN_FORMAT = 2  # 1: method was an untyped dict (read by upgrade_plan_data)
NEURON_ROLES = ("neuron_gate", "neuron_up", "neuron_out")
TENSORS_FORMAT = 1  # the safetensors file's own layout (one float32 tensor per role, keyed by unit)


class BypassSpec(BaseModel):
    form: Literal["full", "lowrank", "constant", "neurons"]
    rank: int | None = None
    neurons: int = 0  # kept FFN neurons (form "neurons")
    activation: str | None = None  # their activation (``gated_ffn.ACTIVATIONS``)
    params: int
    tensors: dict[str, str]  # role (weight|down|up|bias|neuron_gate|neuron_up|neuron_out) -> safetensors key

    @model_validator(mode="after")
    def _neurons_complete(self) -> BypassSpec:
        if self.form == "neurons":
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"a bypass with neurons needs an activation of {', '.join(ACTIVATIONS)}, "
                                 f"not {self.activation!r}")
            missing = [r for r in NEURON_ROLES if r not in self.tensors]
            if missing:
                raise ValueError(f"a bypass with neurons lacks its {', '.join(missing)} tensors")
        return self


class RemovedUnit(BaseModel):
    layer: int
    kind: UnitKind
    score: float
    fit_error: float = Field(description="weighted bypass error relative to the unit's own contribution")
    drop_error: float = Field(1.0, description="the same error with no bypass (always 1 relative)")
    stream_error: float = Field(description="weighted bypass error relative to the residual stream")
    params_removed: int
    bypass: BypassSpec

    @property
    def key(self) -> str:
        return unit_key(self.layer, self.kind)


class SparsityReport(BaseModel):
    target: float
    achieved: float
    removed_params: int
    bypass_params: int
    net: float
    block_params: int


def sparsity_report(removed: list[RemovedUnit], block_params: int, target: float) -> SparsityReport:
    removed_params = sum(u.params_removed for u in removed)
    bypass_params = sum(u.bypass.params for u in removed)
    return SparsityReport(
        target=target,
        achieved=removed_params / block_params,
        removed_params=removed_params,
        bypass_params=bypass_params,
        net=(removed_params - bypass_params) / block_params,
        block_params=block_params,
    )


class Baseline(BaseModel):
    """A plan whose units another method chose (layer drop, ReplaceMe, ...), expressed as a SubFit plan."""

    name: str
    details: dict[str, Any] = Field(default_factory=dict)


class Plan(BaseModel):
    format: int = PLAN_FORMAT
    model: ModelIdentity
    removed: list[RemovedUnit]
    sparsity: SparsityReport
    method: MethodSettings | None = None  # how SubFit chose and fitted the units; None when it did not choose them
    budget: dict[str, Any] | None = None  # the latency/KV/quality budget selection spent, when not --sparsity
    baseline: Baseline | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)

    model_config = {"arbitrary_types_allowed": True}

    def removed_units(self, kind: UnitKind | None = None) -> list[RemovedUnit]:
        return [u for u in self.removed if kind is None or u.kind == kind]

    def settings(self) -> SubFitConfig | None:
        """The settings the plan was made with (method and calibration data), for ``subfit_config.json``.

        None when SubFit's method did not choose the units (a baseline or a hand-made plan): there are none.
        """
        if self.method is None:
            return None
        cal = self.calibration
        data = {"calibration": cal.get("source"), "num_samples": cal.get("num_samples"), "seq_len": cal.get("seq_len")}
        return SubFitConfig(sparsity=self.sparsity.target, **self.method.model_dump(),
                            **{k: v for k, v in data.items() if v is not None})

    def depth_map(self) -> str:
        """One character a layer: ``.`` intact, ``A`` attention gone, ``M`` FFN gone, ``X`` both."""
        gone = {(u.layer, u.kind) for u in self.removed}
        chars = []
        for i in range(self.model.num_layers):
            a, m = (i, "attention") in gone, (i, "mlp") in gone
            chars.append("X" if a and m else "A" if a else "M" if m else ".")
        return "".join(chars)


def bypass_tensors(unit_key: str, bypass: Bypass) -> dict[str, np.ndarray]:
    """safetensors entries for one bypass, float32, keyed ``<unit>.<role>``."""
    roles = {"weight": bypass.weight, "down": bypass.down, "up": bypass.up, "bias": bypass.bias,
             "neuron_gate": bypass.neuron_gate, "neuron_up": bypass.neuron_up, "neuron_out": bypass.neuron_out}
    return {f"{unit_key}.{role}": np.ascontiguousarray(arr, dtype=np.float32)
            for role, arr in roles.items() if arr is not None}


def bypass_spec(unit_key: str, bypass: Bypass) -> BypassSpec:
    tensors = {k.rsplit(".", 1)[1]: k for k in bypass_tensors(unit_key, bypass)}
    return BypassSpec(form=bypass.form, rank=bypass.rank, neurons=bypass.neurons, activation=bypass.activation,
                      params=bypass.num_params, tensors=tensors)


def save_plan(plan: Plan, bypasses: dict[str, np.ndarray], folder: str | os.PathLike) -> Path:
    """Write both plan files into ``folder`` (created if needed); returns the JSON's path."""
    from safetensors.numpy import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(bypasses, str(out / BYPASS_FILE), metadata={"format": str(TENSORS_FORMAT)})
    path = out / PLAN_FILE
    path.write_text(plan.model_dump_json(indent=2) + "\n")
    return path


def upgrade_plan_data(data: Any) -> Any:
    """A plan file's JSON in the current format; format 1 is converted, the current format passes unchanged.

    Format 1 kept the method as an untyped dict: the settings (with int-or-float ranks and prior_samples, and
    ``target="contribution"`` for today's ``unit_output``), the sparsity target once more, and for baselines
    their name and numbers under the same dict.
    """
    if not isinstance(data, dict) or data.get("format", 1) != 1:
        if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] > PLAN_FORMAT:
            raise SubFitError(f"the plan has format {data['format']}, newer than this SubFit reads ({PLAN_FORMAT})")
        return data
    method = dict(data.get("method") or {})
    method.pop("sparsity", None)  # the same as sparsity.target
    name = method.pop("baseline", None)
    details = {k: method.pop(k) for k in list(method) if k not in MethodSettings.model_fields}
    return {**data, "format": PLAN_FORMAT, "method": upgrade_settings_data(method) if method else None,
            "baseline": {"name": name, "details": details} if name else None}


def load_plan(path: str | os.PathLike) -> tuple[Plan, dict[str, np.ndarray]]:
    """Read a plan from its JSON file or its folder; the bypass tensors come from the file beside it."""
    from safetensors.numpy import load_file

    p = Path(path)
    json_path = p / PLAN_FILE if p.is_dir() else p
    if not json_path.is_file():
        raise SubFitError(f"no SubFit plan at {json_path}")
    try:
        plan = Plan.model_validate(upgrade_plan_data(json.loads(json_path.read_text())))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise SubFitError(f"{json_path} is not a valid SubFit plan: {first}") from None
    tensor_path = json_path.parent / BYPASS_FILE
    if not tensor_path.is_file():
        raise SubFitError(f"the plan {json_path} has no {BYPASS_FILE} beside it")
    tensors = load_file(str(tensor_path))
    missing = [k for u in plan.removed for k in u.bypass.tensors.values() if k not in tensors]
    if missing:
        raise SubFitError(f"{tensor_path} lacks bypass tensors: {', '.join(missing[:4])}")
    return plan, tensors


def bypass_from_tensors(unit: RemovedUnit, tensors: dict[str, np.ndarray]) -> Bypass:
    roles = {role: tensors[key] for role, key in unit.bypass.tensors.items()}
    return Bypass(bias=roles["bias"], weight=roles.get("weight"), down=roles.get("down"), up=roles.get("up"),
                  neuron_gate=roles.get("neuron_gate"), neuron_up=roles.get("neuron_up"),
                  neuron_out=roles.get("neuron_out"), activation=unit.bypass.activation)


@dataclass
class CalibratedPlan:
    """A plan and its bypass tensors: what ``calibrate`` returns and ``rewrite`` consumes."""

    plan: Plan
    tensors: dict[str, np.ndarray]
    path: Path | None = None
    seconds: float | None = None

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``subfit_plan.json`` and ``subfit_bypass.safetensors`` into ``folder`` (all or nothing)."""
        with staged_output(folder, overwrite) as work:
            save_plan(self.plan, self.tensors, work / STAGED)
        self.path = Path(folder)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> CalibratedPlan:
        plan, tensors = load_plan(path)
        p = Path(path)
        return cls(plan, tensors, p if p.is_dir() else p.parent)


def as_calibrated_plan(plan: Any) -> CalibratedPlan:
    """Accept a plan folder or JSON path, a ``CalibratedPlan``, or a ``(Plan, tensors)`` pair."""
    if isinstance(plan, CalibratedPlan):
        return plan
    if isinstance(plan, tuple) and len(plan) == 2 and isinstance(plan[0], Plan):
        return CalibratedPlan(plan[0], plan[1])
    if isinstance(plan, (str, Path)):
        return CalibratedPlan.load(plan)
    raise SubFitError(f"plan must be a path, a CalibratedPlan or (Plan, tensors), not {type(plan).__name__}")
