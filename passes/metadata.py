"""Record in the ONNX file itself which units SubFit replaced, so the graph explains itself without config.json.

``onnx.ModelProto.metadata_props`` travels with the file through copies, hubs and optimisers that drop the
folder around it, so a tool that meets the graph alone can read what was replaced (``read_subfit_metadata``).
SubFit itself recognises a compressed graph by its bypass nodes (``passes.structure``), which no optimiser drops.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir

from ..architectures import UnitKind

METADATA_KEY = "subfit"


class RecordSubFitMetadataPass(ir.passes.InPlacePass):
    """Write ``{"removed": [{"layer", "kind"}...], **extra}`` as JSON under the ``subfit`` metadata key."""

    def __init__(self, removed: Iterable[tuple[int, UnitKind]], extra: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.removed = sorted(set(removed))
        self.extra = dict(extra or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        record = {"removed": [{"layer": layer, "kind": kind} for layer, kind in self.removed], **self.extra}
        model.metadata_props[METADATA_KEY] = json.dumps(record, sort_keys=True)
        return ir.passes.PassResult(model, modified=True)


def read_subfit_metadata(model: ir.Model) -> dict[str, Any] | None:
    raw = model.metadata_props.get(METADATA_KEY)
    return json.loads(raw) if raw else None
