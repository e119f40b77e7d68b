"""The file and tensor names SubFit reads and writes, each spelled once.

A model folder holds the files Optimum, transformers and onnxruntime-genai look for by name, plus SubFit's own.
KV-cache tensors are named per layer (``past_key_values.3.key`` in, ``present.3.key`` out); a rewrite drops the
names of removed attentions, so code that runs an export matches KV names by pattern and never counts layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # external weights beside ONNX_FILE
CONFIG_FILE = "config.json"
GENAI_CONFIG_FILE = "genai_config.json"
PLAN_FILE = "subfit_plan.json"
BYPASS_FILE = "subfit_bypass.safetensors"
REPORT_FILE = "subfit_report.json"
SETTINGS_FILE = "subfit_config.json"  # the SubFitConfig a run used (as ORTOptimizer's ort_config.json)
SUBFIT_FILES = (PLAN_FILE, BYPASS_FILE, REPORT_FILE, SETTINGS_FILE)

KVRole = Literal["key", "value"]
KV_ROLES: tuple[KVRole, ...] = ("key", "value")


def unit_key(layer: int, kind: str) -> str:
    """A unit's name in plans and bypass tensors (``layers.7.mlp``)."""
    return f"layers.{layer}.{kind}"


@dataclass(frozen=True)
class KVNames:
    """How a decoder graph names its KV cache: ``{past}.N.key`` inputs and ``{present}.N.key`` outputs."""

    past: str = "past_key_values"
    present: str = "present"
    _pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = "|".join(re.escape(p) for p in (self.past, self.present))
        object.__setattr__(self, "_pattern", re.compile(rf"^({names})\.(\d+)\.(key|value)$"))

    @property
    def past_prefix(self) -> str:
        return f"{self.past}."

    def past_name(self, layer: int, role: KVRole) -> str:
        return f"{self.past}.{layer}.{role}"

    def present_name(self, layer: int, role: KVRole) -> str:
        return f"{self.present}.{layer}.{role}"

    def template(self, which: Literal["past", "present"], role: KVRole) -> str:
        """A printf template (``past_key_values.%d.key``), as onnxruntime-genai's config takes them."""
        return f"{self.past if which == 'past' else self.present}.%d.{role}"

    def parse(self, name: str) -> tuple[Literal["past", "present"], int, KVRole] | None:
        """(``past``/``present``, layer, role) for a KV name, None for any other name."""
        m = self._pattern.match(name or "")
        if m is None:
            return None
        return ("past" if m.group(1) == self.past else "present"), int(m.group(2)), m.group(3)  # type: ignore[return-value]


KV = KVNames()  # Optimum's text-generation-with-past exports (onnxruntime-genai's model builder uses the same)
