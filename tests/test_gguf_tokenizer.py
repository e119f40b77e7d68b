"""Gemma's tokenizer rebuilt from GGUF metadata: merges ranked by file order, spaces, specials and BOS."""

from __future__ import annotations

from pathlib import Path

import pytest

from subfit_onnx.gguf_tokenizer import _merges, gemma_tokenizer_from_gguf

# a Gemma-shaped vocabulary: specials, user-defined newlines and a run of spaces, bytes, then pieces whose file
# order (not their length) decides which merge wins
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "\n", "\n\n", "  ",
          *(f"<0x{b:02X}>" for b in range(256)),
          "a", "b", "c", "\u2581", "ab", "bc", "abc", "\u2581a", "\u2581ab"]
TYPES = [3, 3, 3, 3, 3, 3, 4, 4, 4, *([6] * 256), *([1] * 9)]


def _write_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * len(TOKENS))
    w.add_token_types(TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_merges_follow_file_order():
    merges = _merges(["a", "b", "c", "ab", "bc", "abc"])
    # "ab" (4th) outranks "bc" (5th); "abc" splits as a+bc and ab+c, the longer left piece first
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_tokenizer_from_gguf(tmp_path):
    tok = gemma_tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf"))
    ids = {t: i for i, t in enumerate(TOKENS)}
    assert tok("abc").input_ids == [2, ids["abc"]]  # BOS first, then the merge order the file implies
    assert tok(" ab").input_ids == [2, ids["\u2581ab"]]  # a space is written as the piece "▁"
    assert tok("a<start_of_turn>\n\n").input_ids == [2, ids["a"], ids["<start_of_turn>"], ids["\n\n"]]
    assert tok("z").input_ids == [2, ids["<0x7A>"]]  # unknown characters fall back to bytes
    assert tok.convert_ids_to_tokens(ids["  "]) == "\u2581\u2581"  # a run of spaces is respelled
    assert tok.decode(tok(" ab z").input_ids, skip_special_tokens=True) == " ab z"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 1, 0, 3)


# transformers 5.23.0's own conversion of the same GGUF (AutoTokenizer.from_pretrained(folder, gguf_file=...), run
# in a side environment) on exllamav2's five texts, cut into documents by load_documents and each encoded without
# special tokens: documents, tokens and the sha256 of the ids as little-endian int64.
T5_IDS = {
    "wiki.utf8": (2349, 432238, "d633d091d2b106166b6bbcba4879a6e90ef97f7b1e52de6e1109862bac4f480c"),
    "c4.utf8": (1, 72733, "12223b2c143ab4f870a03429915c4ee1abf5dcb49e845e583ca03a55cdf7f3f8"),
    "code.utf8": (1, 88773, "785f61087ab21391d7e38f16da5773de27dfdd07085a7413380533574910053a"),
    "technical.utf8": (1, 42651, "f8aa7307fcd6d1022a8f88335990ac4ccdf328b37342140092f687599753a668"),
    "tiny.utf8": (1, 63431, "1dbfcb0b8b959c034e408c2f576af21257f07a8c0b5d31a17141ae4584cafc56"),
}


@pytest.mark.real
def test_real_gemma3_tokenizer_gives_transformers_5_ids(gemma3_assets):
    """The fetched tokenizer, loaded by transformers 4.57, gives 5.23's ids on all of the real text (700k ids).

    Loading it logs transformers 4.57's "incorrect regex pattern ... fix_mistral_regex=True" warning. That check
    fires for any local tokenizer with more than 100k tokens whose config.json was saved by transformers 4.57.3
    or later, whatever the model; without the flag nothing is changed, and with it 4.57 fails on Gemma's
    single-Split pre-tokenizer. These ids are the proof that the warning is harmless here.
    """
    import hashlib

    import numpy as np
    from transformers import AutoTokenizer

    from subfit_onnx.calibration.text import load_documents

    tok = AutoTokenizer.from_pretrained(gemma3_assets.gemma3)
    for name, (documents, tokens, sha256) in T5_IDS.items():
        docs = load_documents(gemma3_assets.text / name)
        ids = np.concatenate([np.asarray(tok.encode(d, add_special_tokens=False), dtype="<i8") for d in docs])
        assert (len(docs), ids.size) == (documents, tokens), name
        assert hashlib.sha256(ids.tobytes()).hexdigest() == sha256, name
    assert tok("Hello world").input_ids == [2, 9259, 1902]  # BOS first, as Gemma is deployed
