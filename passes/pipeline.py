"""The SubFit rewrite as one onnx-ir pass pipeline: bypasses in, removed attentions' KV cache out, dead nodes gone.

``SubFitRewritePass`` composes the passes with ``onnx_ir.passes.PassManager``, in the order they need: the
bypasses first; then, for removed attentions, their ``present`` outputs (which keep the K/V projections alive),
dead-node elimination, and their ``past`` inputs (whose bookkeeping readers move to a kept layer); dead-node
elimination again, and the record of what was replaced. The decoder structure is found once by the caller and
handed to every pass that needs it. What the rewrite did comes back in ``SubFitRewriteResult``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..architectures import UnitKind
from ..bypass import Bypass
from ..errors import SubFitError
from .bypass import InsertBypassPass
from .kv_cache import DropPastInputsPass, DropPresentOutputsPass
from .metadata import RecordSubFitMetadataPass
from .structure import DecoderStructure


@dataclass
class SubFitRewriteResult(ir.passes.PassResult):
    bypass_params: int = 0  # parameters the bypasses add


class SubFitRewritePass(ir.passes.InPlacePass):
    """Replace each listed unit by its bypass and drop the KV cache of every removed attention."""

    def __init__(self, structure: DecoderStructure, bypasses: Mapping[tuple[int, UnitKind], Bypass],
                 metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.structure = structure
        self.bypasses = dict(bypasses)
        self.metadata = metadata

    def passes(self) -> list[ir.passes.PassBase]:
        attention = sorted(layer for layer, kind in self.bypasses if kind == "attention")
        steps: list[ir.passes.PassBase] = [InsertBypassPass(self.structure, self.bypasses)]
        if attention:
            steps += [DropPresentOutputsPass(attention, self.structure.layout.kv), RemoveUnusedNodesPass(),
                      DropPastInputsPass(attention, self.structure.layout)]
        return [*steps, RemoveUnusedNodesPass(), RecordSubFitMetadataPass(self.bypasses.keys(), self.metadata)]

    def call(self, model: ir.Model) -> SubFitRewriteResult:
        try:
            result = ir.passes.PassManager(self.passes())(model)
        except ir.passes.PassError as exc:  # the pass manager wraps errors; bad input stays a SubFitError
            cause: BaseException | None = exc
            while isinstance(cause, ir.passes.PassError):
                cause = cause.__cause__
            if isinstance(cause, SubFitError):
                raise cause from None
            raise
        return SubFitRewriteResult(
            result.model, result.modified,
            bypass_params=sum(b.num_params for b in self.bypasses.values()),
        )
