"""Shared pieces of the rewrite tests: hand-made plans, ONNX Runtime and PyTorch runs of prefill + one decode step.

A hand-made plan puts random bypasses at the scale a fitted one has (unit-norm-ish maps of the normed stream,
small biases), so parity checks exercise real magnitudes without a calibration run per test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from subfit_onnx.bypass import Bypass
from subfit_onnx.names import unit_key
from subfit_onnx.plan import Plan, RemovedUnit, SparsityReport, bypass_spec, bypass_tensors
from subfit_onnx.torch_model import gated_ffn, model_identity, unit_param_table

UnitSpec = tuple[int, str, str]  # (layer, kind, form) with form "full" | "lowrank" | "constant" | "neurons"


def random_bypass(hidden: int, form: str, rng: np.random.Generator, rank: int = 8, activation: str | None = None,
                  neurons: int = 16) -> Bypass:
    bias = 0.1 * rng.standard_normal(hidden)
    if form == "neurons":  # a low-rank map plus ``neurons`` kept FFN neurons
        linear = random_bypass(hidden, "lowrank", rng, rank)
        return Bypass(bias=bias, down=linear.down, up=linear.up, activation=activation,
                      neuron_gate=rng.standard_normal((hidden, neurons)) / np.sqrt(hidden),
                      neuron_up=rng.standard_normal((hidden, neurons)) / np.sqrt(hidden),
                      neuron_out=0.5 * rng.standard_normal((neurons, hidden)) / np.sqrt(neurons))
    if form == "full":
        return Bypass(bias=bias, weight=0.5 * rng.standard_normal((hidden, hidden)) / np.sqrt(hidden))
    if form == "lowrank":
        return Bypass(bias=bias, down=rng.standard_normal((hidden, rank)) / np.sqrt(hidden),
                      up=0.5 * rng.standard_normal((rank, hidden)) / np.sqrt(rank))
    return Bypass(bias=bias)


def hand_plan(model: torch.nn.Module, units: Sequence[UnitSpec], seed: int = 0) -> tuple[Plan, dict[str, np.ndarray]]:
    """A valid plan removing ``units`` with random bypasses, as calibration would write it."""
    identity = model_identity(model)
    params = unit_param_table(model)
    rng = np.random.default_rng(seed)
    removed, tensors = [], {}
    for layer, kind, form in units:
        key = unit_key(layer, kind)
        ffn = gated_ffn(model, layer) if form == "neurons" else None
        bypass = random_bypass(identity.hidden_size, form, rng, activation=ffn.activation if ffn else None)
        tensors.update(bypass_tensors(key, bypass))
        removed.append(RemovedUnit(layer=layer, kind=kind, score=0.0, fit_error=0.1, stream_error=0.01,
                                   params_removed=params[(layer, kind)], bypass=bypass_spec(key, bypass)))
    block = sum(params.values())
    gone = sum(u.params_removed for u in removed)
    extra = sum(u.bypass.params for u in removed)
    plan = Plan(model=identity, removed=removed,
                sparsity=SparsityReport(target=gone / block, achieved=gone / block, removed_params=gone,
                                        bypass_params=extra, net=(gone - extra) / block, block_params=block))
    return plan, {k: v.astype(np.float32) for k, v in tensors.items()}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def ort_prefill_decode(path: Path, ids: np.ndarray, next_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits of a prefill on ``ids`` and of one decode step on ``next_ids`` fed the prefill's present outputs."""
    sess = session(path)
    inputs = {i.name: i for i in sess.get_inputs()}
    kv_names = [n for n in inputs if n.startswith("past_key_values.")]
    batch, seq = ids.shape

    def feed(tokens: np.ndarray, past: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        length = tokens.shape[1]
        d = {"input_ids": tokens.astype(np.int64),
             "attention_mask": np.ones((batch, start + length), dtype=np.int64)}
        if "position_ids" in inputs:
            d["position_ids"] = np.tile(np.arange(start, start + length, dtype=np.int64), (batch, 1))
        d.update(past)
        return d

    empty = {}
    for name in kv_names:
        shape = inputs[name].shape
        empty[name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=_NP[inputs[name].type])
    out_names = [o.name for o in sess.get_outputs()]
    first = dict(zip(out_names, sess.run(None, feed(ids, empty, 0))))
    past = {n: first[n.replace("past_key_values.", "present.")] for n in kv_names}
    second = dict(zip(out_names, sess.run(None, feed(next_ids, past, seq))))
    return first["logits"].astype(np.float32), second["logits"].astype(np.float32), kv_names


@torch.no_grad()
def torch_prefill_decode(model: torch.nn.Module, ids: np.ndarray, next_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first = model(input_ids=torch.as_tensor(ids), use_cache=True)
    mask = torch.ones(ids.shape[0], ids.shape[1] + next_ids.shape[1], dtype=torch.long)
    second = model(input_ids=torch.as_tensor(next_ids), attention_mask=mask, past_key_values=first.past_key_values,
                   use_cache=True)
    return first.logits.float().numpy(), second.logits.float().numpy()


def rel_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|actual - expected| relative to the logit scale max|expected|."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
