"""Multiple-choice accuracy: the metric arithmetic on handmade scores, and known answers on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.errors import SubFitError
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.multiple_choice import MCItem, accuracy, encode_pair, evaluate_mc, load_mc_items


def test_acc_and_length_normalized_acc():
    items = [
        MCItem("q1", ("a", "bbbbbbbbbb"), label=1),  # raw: "a" wins (-2 > -5); per char: -2/1 < -5/10 -> long wins
        MCItem("q2", ("xx", "y"), label=0),  # raw: -1 > -3 -> 0 right; per char: -0.5 > -3 -> right
        MCItem("q3", ("cc", "d", "eeee"), label=2),  # raw: choice 1; per char: -4/2=-2, -1.5, -4/4=-1 -> 2 right
        MCItem("q4", ("f", "g"), label=1),  # wrong both ways
    ]
    lls = [np.array([-2.0, -5.0]), np.array([-1.0, -3.0]), np.array([-4.0, -1.5, -4.0]), np.array([-1.0, -2.0])]
    res = accuracy(lls, items, "hand")
    assert res.acc == pytest.approx(1 / 4)
    assert res.acc_norm == pytest.approx(3 / 4)
    assert res.chance == pytest.approx((0.5 + 0.5 + 1 / 3 + 0.5) / 4)
    assert res.n == 4


def torch_choice_lls(model, tokenizer, item: MCItem) -> np.ndarray:
    """Independent scoring: one full forward per choice, summed log-softmax over the continuation tokens."""
    out = []
    for choice in item.choices:
        ctx = tokenizer.encode(item.input, add_special_tokens=False)
        whole = tokenizer.encode(item.input + " " + choice, add_special_tokens=False)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return np.asarray(out)


def test_known_answers_on_tiny_model(tiny_exports, tiny_checkpoint, tmp_path):
    """Labels are set from an independent PyTorch scoring so that exactly 3 of 5 (raw) items are right."""
    ckpt = tiny_checkpoint("llama")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    questions = ["The cat sat on the", "Two plus two is", "Paris is the capital of", "Water boils at", "Hello"]
    choices = [("mat", "moon", "sky"), ("four", "five"), ("France", "Spain", "Italy", "Chad"), ("100 C", "0 C"),
               ("world", "there", "you")]
    rows, right_raw, right_norm = [], 0, 0
    for n, (q, ch) in enumerate(zip(questions, choices)):
        lls = torch_choice_lls(model, tok, MCItem(q, ch, 0))
        best, worst = int(np.argmax(lls)), int(np.argmin(lls))
        label = best if n < 3 else worst
        right_raw += label == best
        right_norm += label == int(np.argmax(lls / np.array([len(c) for c in ch])))
        rows.append({"input": q, "choices": list(ch), "label": label})
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = evaluate_mc(OnnxDecoder(tiny_exports["dense"]), path)
    assert right_raw == 3
    assert res.acc == pytest.approx(3 / 5)
    assert res.acc_norm == pytest.approx(right_norm / 5)
    assert res.task == "hand" and res.n == 5
    # the same answers through the KV-gap and the KV-less graphs
    for variant in ("gaps", "nokv"):
        other = evaluate_mc(OnnxDecoder(tiny_exports[variant]), path)
        assert (other.acc, other.acc_norm) == (res.acc, res.acc_norm)
    assert evaluate_mc(OnnxDecoder(tiny_exports["dense"]), path, limit=2).n == 2


def test_encode_pair_moves_trailing_space(tiny_exports):
    tok = OnnxDecoder(tiny_exports["dense"]).tokenizer
    ctx, cont = encode_pair(tok, "abc ", "d")
    assert tok.decode(ctx) == "abc" and tok.decode(cont) == " d"


@pytest.mark.parametrize("line, message", [
    ('{"input": "q", "choices": ["a", "b"], "label": 2}', "label must be an index"),
    ('{"input": "q", "choices": ["a"], "label": 0}', "at least two strings"),
    ('{"input": "q", "label": 0}', "needs"),
    ("not json", "not valid JSON"),
])
def test_bad_mc_lines_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
    with pytest.raises(SubFitError, match=message) as err:
        load_mc_items(path)
    assert "\n" not in str(err.value) and ":2" in str(err.value)
