"""The lm-eval model ``subfit-ort``: a local JSONL multiple-choice task, rolling log-likelihood, generation, and
the ``python -m subfit_onnx.lm_eval`` wrapper of lm-eval's own CLI. Skipped without the ``eval`` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (extra 'eval')")

from lm_eval.api.instance import Instance

from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.logprobs import token_logprobs
from subfit_onnx.evaluation.multiple_choice import evaluate_mc

SHARED_MC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mc" / "social_iqa.jsonl"
TASK = "subfit_local_mc"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A task folder for --include_path: 8 items of the shared social_iqa set (or handmade ones without it)."""
    root = tmp_path_factory.mktemp("lm-eval-task")
    if SHARED_MC.is_file():
        lines = SHARED_MC.read_text(encoding="utf-8").splitlines()[:8]
    else:
        lines = [json.dumps({"input": f"Item {i} asks", "choices": ["yes", "no", "later"], "label": i % 3})
                 for i in range(8)]
    data = root / "items.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{input}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return root, data


@pytest.fixture(scope="module")
def lm(tiny_exports):
    from subfit_onnx.evaluation.lm_eval_model import SubFitORTLM

    return SubFitORTLM(path=str(tiny_exports["gaps"]))


def test_model_is_registered_beside_the_builtins():
    from lm_eval.api.registry import get_model

    import subfit_onnx.evaluation.lm_eval_model  # noqa: F401

    assert get_model("subfit-ort").__name__ == "SubFitORTLM"
    assert get_model("dummy").__name__ == "DummyLM"  # built-in models still resolve


def test_local_mc_task_matches_evaluate_mc(tiny_exports, local_task, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import subfit_onnx.evaluation.lm_eval_model  # noqa: F401

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    root, data = local_task
    out = lm_eval.simple_evaluate(model="subfit-ort", model_args=f"path={tiny_exports['gaps']}", tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(root)))
    res = out["results"][TASK]
    ours = evaluate_mc(OnnxDecoder(tiny_exports["dense"]), data)
    assert res["acc,none"] == pytest.approx(ours.acc)
    assert res["acc_norm,none"] == pytest.approx(ours.acc_norm)


def test_rolling_loglikelihood_equals_full_forward(lm, tiny_exports):
    text = "The quick brown fox jumps over the lazy dog."
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    logits = OnnxDecoder(tiny_exports["dense"]).forward(np.asarray([ids])).logits[0, :-1]
    assert got == pytest.approx(float(token_logprobs(logits, np.asarray(ids[1:])).sum()), abs=1e-3)
    assert got < -10  # a random model: far from certain


def test_rolling_windows_shorter_than_the_text(tiny_exports):
    from subfit_onnx.evaluation.lm_eval_model import SubFitORTLM

    short = SubFitORTLM(path=str(tiny_exports["dense"]), max_length=16)
    text = "abcdefghijklmnopqrstuvwxyz" * 2 + "0123"
    (got,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tokens = short.tok_encode(text)
    dec = OnnxDecoder(tiny_exports["dense"])

    def scored(inputs: list[int], targets: list[int], last: int) -> float:
        logits = dec.forward(np.asarray([inputs])).logits[0]
        return float(token_logprobs(logits, np.asarray(targets))[-last:].sum())

    # lm-eval's rolling windows for max_length 16: the first predicts tokens 0..15 after the prefix token; each
    # later one reads the 16 tokens before its end and scores only the tokens not predicted yet
    total, done = scored([short.prefix_token_id] + tokens[:15], tokens[:16], 16), 16
    assert len(tokens) > 3 * 16
    while done < len(tokens):
        end = min(done + 16, len(tokens))
        total += scored(tokens[end - 17 : end - 1], tokens[end - 16 : end], end - done)
        done = end
    assert got == pytest.approx(total, abs=1e-3)


def test_generate_until_is_greedy_and_stops(lm, tiny_exports):
    context = "Once upon a time"
    dec = OnnxDecoder(tiny_exports["dense"])
    greedy = dec.greedy(lm.tok_encode(context), 12)
    text = lm.tok_decode(greedy)
    (free,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)],
                                disable_tqdm=True)
    assert free == text
    stop = text[3:5]
    (cut,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0)],
                               disable_tqdm=True)
    assert cut == text.split(stop)[0] and len(cut) < len(text)


def test_lm_eval_cli_through_the_wrapper(tiny_exports, local_task):
    root, _ = local_task
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "subfit_onnx.lm_eval", "--model", "subfit-ort", "--model_args",
         f"path={tiny_exports['dense']}", "--tasks", TASK, "--include_path", str(root), "--limit", "4"],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert TASK in proc.stdout and "acc_norm" in proc.stdout
