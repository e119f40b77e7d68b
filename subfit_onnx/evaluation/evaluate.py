"""One call for ``subfit-onnx evaluate``: perplexity and multiple-choice accuracy, optionally against a reference.

The text is tokenized once with the candidate's tokenizer and the same windows go to both models; each MC file
is scored on the same items by both. Models run one after the other (quality numbers are deterministic, so
unlike timings they need no interleaving), and only one ORT session is alive at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import SubFitError
from ..onnx_files import checked_exports
from ..progress import ProgressFactory, silent
from .decoder import OnnxDecoder, check_same_vocab, load_tokenizer
from .multiple_choice import evaluate_mc
from .perplexity import DEFAULT_WINDOW_LEN, DEFAULT_WINDOWS, make_windows, window_perplexity


def _one_model(decoder: OnnxDecoder, windows: Any, tasks: Sequence[Path], limit: int | None, tokenizer: Any,
               progress: ProgressFactory) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(decoder.model_dir), "kv_layers": list(decoder.signature.kv_layers)}
    if windows is not None:
        out["perplexity"] = asdict(window_perplexity(decoder, windows, progress))
    out["tasks"] = {}
    for task in tasks:
        res = evaluate_mc(decoder, task, limit, progress, tokenizer=tokenizer)
        out["tasks"][res.task] = asdict(res)
    return out


def evaluate_export(model_dir: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                    text: str | os.PathLike | None = None, tasks: Sequence[str | os.PathLike] = (),
                    windows: int = DEFAULT_WINDOWS, window_len: int = DEFAULT_WINDOW_LEN, limit: int | None = None,
                    provider: str = "cpu", progress: ProgressFactory = silent) -> dict[str, Any]:
    """Perplexity on ``text`` (file, folder or dataset spec) and accuracy on each MC JSONL in ``tasks``.

    Returns ``{"model": {...}, "reference": {...} | None, "ratios": {...} | None}``; ratios are model/reference.
    """
    if text is None and not tasks:
        raise SubFitError("nothing to evaluate: give --text/--dataset and/or --tasks")
    task_paths = [Path(t) for t in tasks]
    names = [p.stem for p in task_paths]
    if len(set(names)) != len(names):
        raise SubFitError("two --tasks files share a name; rename one so results stay apart")
    for p in task_paths:
        if not p.is_file():
            raise SubFitError(f"multiple-choice file {p} does not exist")
    (model_root, _), *_ = checked_exports(model_dir, reference)  # every input is checked before any model runs
    if reference is not None:
        check_same_vocab(model_dir, reference)
    tokenizer = load_tokenizer(model_root)
    ppl_windows = make_windows(tokenizer, text, windows, window_len) if text is not None else None
    cand = OnnxDecoder(model_dir, provider)
    result: dict[str, Any] = {"model": _one_model(cand, ppl_windows, task_paths, limit, tokenizer, progress),
                              "reference": None, "ratios": None}
    if reference is not None:
        del cand  # one session at a time keeps memory at one model
        ref = OnnxDecoder(reference, provider)
        result["reference"] = _one_model(ref, ppl_windows, task_paths, limit, tokenizer, progress)
        result["ratios"] = _ratios(result["model"], result["reference"])
    return result


def _ratios(model: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "perplexity" in model:
        out["perplexity"] = model["perplexity"]["perplexity"] / ref["perplexity"]["perplexity"]
    for task, mc in model["tasks"].items():
        for metric in ("acc", "acc_norm"):
            base = ref["tasks"][task][metric]
            if base:
                out[f"{task}.{metric}"] = mc[metric] / base
    return out
