"""The fetched real assets behave like the released models they stand for."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real


def test_smollm2_tokenizer_adds_no_bos_like_the_released_one(smollm2_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_assets.model)
    ids = tok("The capital of France is").input_ids
    assert ids[0] != tok.bos_token_id and ids == tok("The capital of France is", add_special_tokens=False).input_ids
