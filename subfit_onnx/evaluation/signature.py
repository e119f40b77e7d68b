"""What a decoder export takes and returns, read from its graph's input and output names.

SubFit's rewrite removes the KV inputs of every attention it drops, so KV layer indices can have gaps
(0, 2, 3, 7) and the graph may have no KV at all. Gemma3 exports have no ``position_ids``. Everything that runs
an export therefore looks inputs up by name here instead of assuming the dense layout, and sizes the empty past
from the graph's own KV shapes (static dims) before falling back to the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from ..model_config import kv_shape
from ..names import KV, KV_ROLES

ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}
KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ORT type string and shape (ints or symbolic names)."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]

    @property
    def dtype(self) -> np.dtype:
        try:
            return ORT_TYPES[self.type]
        except KeyError:
            raise UnsupportedModelError(f"graph tensor {self.name} has unsupported type {self.type}") from None


@dataclass(frozen=True)
class KVLayer:
    """The past/present tensors of one kept attention, with the per-token shape of its cache."""

    layer: int
    key_input: str
    value_input: str
    key_output: str
    value_output: str
    heads: int
    key_dim: int
    value_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes this layer's cache grows by per token and sequence (keys plus values)."""
        return self.heads * (self.key_dim + self.value_dim) * self.dtype.itemsize


@dataclass(frozen=True)
class DecoderSignature:
    """Names and KV layout of one ``text-generation-with-past`` export (dense or rewritten)."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    kv: tuple[KVLayer, ...]

    @property
    def has_kv(self) -> bool:
        return bool(self.kv)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        return tuple(k.layer for k in self.kv)

    @property
    def kv_dtype(self) -> np.dtype | None:
        return self.kv[0].dtype if self.kv else None

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of context, batch 1, summed over the layers that still have attention."""
        return sum(k.bytes_per_token for k in self.kv)

    def kv_bytes(self, context: int, batch: int = 1) -> int:
        return self.kv_bytes_per_token * context * batch

    def uniform_kv_shape(self) -> tuple[int, int] | None:
        """(kv heads, head_dim) when every layer agrees and keys and values share head_dim, else None."""
        shapes = {(k.heads, k.key_dim, k.value_dim) for k in self.kv}
        if len(shapes) != 1:
            return None
        heads, kdim, vdim = shapes.pop()
        return (heads, kdim) if kdim == vdim else None

    def present_to_past(self) -> dict[str, str]:
        return {o: i for k in self.kv for o, i in ((k.key_output, k.key_input), (k.value_output, k.value_input))}


def _static(dim: Any, fallback: int | None, what: str, name: str) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if fallback is None:
        raise UnsupportedModelError(f"cannot tell the {what} of {name}: the graph dim is symbolic and the config has none")
    return int(fallback)


def read_signature(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], config: Any = None) -> DecoderSignature:
    """Build the signature from graph inputs/outputs (e.g. ``session.get_inputs()``) and an optional config.

    KV tensors are matched by name, so any subset of layers works; each past input must have its matching
    ``present`` output. Heads and head_dim come from static graph dims first, the config second.
    """
    ins = {t.name: t for t in inputs}
    outs = {t.name: t for t in outputs}
    if "input_ids" not in ins:
        raise UnsupportedModelError("the graph has no input_ids input; only token-id decoders are supported")
    past: dict[int, dict[str, TensorSpec]] = {}
    for name, spec in ins.items():
        kv = KV.parse(name)
        if kv is not None and kv[0] == "past":
            past.setdefault(kv[1], {})[kv[2]] = spec
        elif name not in KNOWN_INPUTS:
            raise UnsupportedModelError(
                f"graph input {name!r} is not supported (expected input_ids, attention_mask, position_ids, "
                "past_key_values.N.key/value; re-export with task text-generation-with-past)"
            )
    logits = "logits" if "logits" in outs else next((n for n in outs if not KV.parse(n)), None)
    if logits is None:
        raise UnsupportedModelError("the graph has no logits output")
    cfg_heads, cfg_dim = kv_shape(config) if config is not None else (None, None)  # for symbolic graph dims
    layers = []
    for layer in sorted(past):
        pair = past[layer]
        if set(pair) != {"key", "value"}:
            raise UnsupportedModelError(f"layer {layer} has a past {next(iter(pair))} but no matching past tensor")
        key, value = pair["key"], pair["value"]
        out_names = [KV.present_name(layer, role) for role in KV_ROLES]
        missing = [n for n in out_names if n not in outs]
        if missing:
            raise UnsupportedModelError(f"the graph takes past for layer {layer} but has no output {missing[0]}")
        if len(key.shape) != 4 or len(value.shape) != 4:
            raise UnsupportedModelError(f"KV input {key.name} is not 4-D (batch, heads, seq, head_dim)")
        if key.dtype != value.dtype:
            raise UnsupportedModelError(f"layer {layer} keeps keys and values in different dtypes")
        layers.append(KVLayer(
            layer=layer, key_input=key.name, value_input=value.name, key_output=out_names[0], value_output=out_names[1],
            heads=_static(key.shape[1], cfg_heads, "KV head count", key.name),
            key_dim=_static(key.shape[3], cfg_dim, "head_dim", key.name),
            value_dim=_static(value.shape[3], cfg_dim, "head_dim", value.name),
            dtype=key.dtype,
        ))
    return DecoderSignature(
        input_ids="input_ids",
        attention_mask="attention_mask" if "attention_mask" in ins else None,
        position_ids="position_ids" if "position_ids" in ins else None,
        logits=logits,
        kv=tuple(layers),
    )


def specs_from_session(nodes: Sequence[Any]) -> list[TensorSpec]:
    """``TensorSpec`` list from ``session.get_inputs()`` / ``get_outputs()`` (ORT ``NodeArg`` objects)."""
    return [TensorSpec(n.name, n.type, tuple(n.shape)) for n in nodes]


def specs_from_onnx(values: Sequence[Any]) -> list[TensorSpec]:
    """``TensorSpec`` list from ``onnx.ModelProto.graph.input``/``output`` (``ValueInfoProto``)."""
    import onnx

    specs = []
    for v in values:
        tt = v.type.tensor_type
        elem = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        type_name = next((k for k, d in ORT_TYPES.items() if d == elem), f"tensor({elem})")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(TensorSpec(v.name, type_name, shape))
    return specs
