"""Tiny models saved as real Hugging Face folders (weights + a character tokenizer) and their Optimum exports.

The CLI takes folders, not objects, and calibrates from text, so end-to-end tests need a checkpoint with a
tokenizer whose ids fit the tiny vocabulary (256). A character-level WordLevel tokenizer does, builds offline in
milliseconds, and makes "N x L tokens" easy to reason about (one token per character).
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import tiny_model

SPECIALS = ("<unk>", "<s>", "</s>")
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def char_tokenizer(adds_bos: bool = False):
    """``adds_bos``: every encoded text starts with ``<s>``, as Gemma's and Llama-3's tokenizers do."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


def save_checkpoint(family: str, folder: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    model = tiny_model(family, seed=seed, overrides=overrides)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. SubFit removes attention and feed-forward units of a decoder "
    "language model and replaces each with a linear bypass fitted in closed form on calibration activations.\n"
)


def write_text(path: Path, repeats: int = 40) -> Path:
    path.write_text(SAMPLE_TEXT * repeats, encoding="utf-8")
    return path
