"""Multiple-choice accuracy from choice log-likelihoods, on ``{"input", "choices", "label"}`` JSONL files.

Scoring follows lm-eval's ``multiple_choice`` convention so numbers line up with the harness: the context is
the ``input`` text, each continuation is ``" " + choice``, tokenized as a pair (context and continuation encoded
together, then split, with trailing spaces of the context moved into the continuation). ``acc`` picks the
highest summed log-likelihood; ``acc_norm`` divides it by the number of characters of the choice (without the delimiter, as lm-eval does). No
BOS is added unless the context is empty (then the BOS, or EOS, token is the context).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SubFitError
from ..jsonl import read_jsonl
from ..progress import ProgressFactory, progress_bar, silent
from .decoder import OnnxDecoder
from .logprobs import ContinuationScorer

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class MCItem:
    input: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class MCResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    chance: float


def load_mc_items(path: str | os.PathLike, limit: int | None = None) -> list[MCItem]:
    """Items of a JSONL file (first ``limit`` only), validated line by line with one-line errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SubFitError(f"multiple-choice file {p} does not exist")
    if limit is not None and limit < 1:
        raise SubFitError("--limit must be at least 1")
    items: list[MCItem] = []
    for n, row in read_jsonl(p):
        if not {"input", "choices", "label"} <= row.keys():
            raise SubFitError(f'{p}:{n} needs "input", "choices" and "label" fields')
        choices, label = row["choices"], row["label"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise SubFitError(f"{p}:{n}: choices must be a list of at least two strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise SubFitError(f"{p}:{n}: label must be an index into choices (0..{len(choices) - 1})")
        items.append(MCItem(str(row["input"]), tuple(choices), label))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise SubFitError(f"multiple-choice file {p} holds no items")
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split from the joint encoding so merges at the seam count."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return ctx, whole[len(ctx):]


def choice_loglikelihoods(scorer: ContinuationScorer, tokenizer: Any, item: MCItem) -> np.ndarray:
    """Summed log-likelihood of each choice after the item's input."""
    lls = []
    for choice in item.choices:
        ctx, cont = encode_pair(tokenizer, item.input, TARGET_DELIMITER + choice)
        lp, _ = scorer.score(ctx, cont)
        lls.append(float(lp.sum()))
    return np.asarray(lls)


def accuracy(lls: Sequence[np.ndarray], items: Sequence[MCItem], task: str) -> MCResult:
    """acc and acc_norm (log-likelihood / characters of the choice) from per-item choice scores."""
    hits = norm_hits = 0
    for ll, item in zip(lls, items):
        chars = np.asarray([max(len(c), 1) for c in item.choices], dtype=np.float64)
        hits += int(np.argmax(ll)) == item.label
        norm_hits += int(np.argmax(ll / chars)) == item.label
    n = len(items)
    chance = float(np.mean([1.0 / len(i.choices) for i in items]))
    return MCResult(task=task, n=n, acc=hits / n, acc_norm=norm_hits / n, chance=chance)


def evaluate_mc(decoder: OnnxDecoder, path: str | os.PathLike, limit: int | None = None,
                progress: ProgressFactory = silent, tokenizer: Any = None) -> MCResult:
    """Accuracy of ``decoder`` on the first ``limit`` items of a JSONL multiple-choice file."""
    items = load_mc_items(path, limit)
    tok = tokenizer if tokenizer is not None else decoder.tokenizer
    scorer = ContinuationScorer(decoder)
    lls = []
    with progress_bar(progress, f"{Path(path).stem} {decoder.name}", len(items)) as bar:
        for item in items:
            lls.append(choice_loglikelihoods(scorer, tok, item))
            bar.update(1)
    return accuracy(lls, items, Path(path).stem)
