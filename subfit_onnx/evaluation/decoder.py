"""A raw ONNX Runtime session over one decoder export, fed by input name.

Evaluation and benchmarks run the graph directly rather than through Optimum: every number then comes from
the same session a deployment would use, with no torch in the loop, and nothing depends on Optimum's table of
model types. Inputs are looked up in the graph's :class:`DecoderSignature`, so rewritten exports (KV gaps, no
KV at all) and exports without ``position_ids`` (Gemma3) run unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SubFitError
from ..model_config import config_value, read_config
from ..onnx_files import export_paths
from ..runtime import open_session, ort_session_options
from .signature import DecoderSignature, read_signature, specs_from_session

Past = dict[str, np.ndarray]


@dataclass
class Step:
    """Output of one forward: logits (batch, seq, vocab) and the past to feed next (empty dict without KV)."""

    logits: np.ndarray
    past: Past


class OnnxDecoder:
    """One export, one ``InferenceSession``: prefill and decode with explicit past, batch along axis 0."""

    def __init__(self, model_dir: str | os.PathLike, provider: str = "cpu", session_options: Any = None):
        self.model_dir, self.model_path = export_paths(model_dir)
        self.config = read_config(self.model_dir, required=True)
        self.provider = provider
        self.session = open_session(self.model_path, provider, session_options or ort_session_options())
        inputs = specs_from_session(self.session.get_inputs())
        self.signature: DecoderSignature = read_signature(
            inputs, specs_from_session(self.session.get_outputs()), self.config)
        self._dtypes = {t.name: t.dtype for t in inputs}
        self._outputs = [self.signature.logits] + [n for k in self.signature.kv for n in (k.key_output, k.value_output)]
        self._present_to_past = self.signature.present_to_past()
        self._tokenizer = None

    @property
    def name(self) -> str:
        return self.model_dir.name

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the graph (Optimum copies it into the export folder)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int | None:
        return config_value(self.config, "vocab_size")

    def empty_past(self, batch: int = 1) -> Past:
        """Zero-length past for prefill, shaped (batch, kv heads, 0, head_dim) from the graph's KV inputs."""
        return {
            name: np.zeros((batch, k.heads, 0, dim), dtype=k.dtype)
            for k in self.signature.kv
            for name, dim in ((k.key_input, k.key_dim), (k.value_input, k.value_dim))
        }

    @staticmethod
    def past_length(past: Past | None) -> int:
        return next(iter(past.values())).shape[2] if past else 0

    def forward(self, input_ids: np.ndarray | Sequence[int], past: Past | None = None) -> Step:
        """Run ``input_ids`` (batch, seq) after ``past`` (None: empty); positions continue from the past length."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        batch, seq = ids.shape
        sig = self.signature
        if past is None:
            past = self.empty_past(batch)
        start = self.past_length(past)
        feeds: dict[str, np.ndarray] = {sig.input_ids: ids.astype(self._dtypes[sig.input_ids], copy=False)}
        if sig.attention_mask:
            feeds[sig.attention_mask] = np.ones((batch, start + seq), dtype=self._dtypes[sig.attention_mask])
        if sig.position_ids:
            pos = np.arange(start, start + seq, dtype=self._dtypes[sig.position_ids])
            feeds[sig.position_ids] = np.broadcast_to(pos, (batch, seq)).copy()
        feeds.update(past)
        out = self.session.run(self._outputs, feeds)
        new_past = {self._present_to_past[name]: value for name, value in zip(self._outputs[1:], out[1:])}
        return Step(logits=out[0], past=new_past)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding with the KV cache (or by re-running the whole sequence when the graph has none).

        The plain loop a deployment writes by hand: the baseline the other runtimes are compared against.
        """
        tokens = list(prompt)
        new: list[int] = []
        step = self.forward(np.asarray([tokens], dtype=np.int64))
        stops = set(stop_ids)
        while len(new) < max_new_tokens:
            nxt = int(step.logits[0, -1].argmax())
            new.append(nxt)
            if nxt in stops or len(new) >= max_new_tokens:
                break
            tokens.append(nxt)
            if self.signature.has_kv:
                step = self.forward(np.asarray([[nxt]], dtype=np.int64), step.past)
            else:
                step = self.forward(np.asarray([tokens], dtype=np.int64))
        return new


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """``AutoTokenizer`` from the export folder, or a one-line SubFitError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for a folder without tokenizer files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SubFitError(f"no usable tokenizer in {Path(model_dir)}: {first[:200]}") from None


def check_same_vocab(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Ratios only mean something when both models score the same token ids; refuse different vocabularies.

    Read from the configs, so it runs before either model is loaded.
    """
    va = config_value(read_config(a, required=True), "vocab_size")
    vb = config_value(read_config(b, required=True), "vocab_size")
    if va and vb and va != vb:
        raise SubFitError(f"{Path(a)} and {Path(b)} have different vocabularies "
                          f"({va} vs {vb} tokens); compare a model with its own dense export")
