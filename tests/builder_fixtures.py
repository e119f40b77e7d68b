"""onnxruntime-genai model-builder outputs of the tiny checkpoints, committed under ``tests/fixtures/builder``.

The builder (onnxruntime-genai 0.18) needs transformers 5.x, which this project's pin (4.57) excludes, so the
graphs are built once in a side environment by ``tests/fixtures/build_builder_fixtures.py`` and committed.
The checkpoints themselves are not committed: ``fixture_checkpoint`` rebuilds them here from ``tiny_models``
(seeded, torch pinned), and ``manifest.json`` records a digest of their weights so a test can tell when the
committed graphs no longer match what ``tiny_models`` makes (then rebuild the fixtures).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "builder"
MANIFEST = FIXTURES / "manifest.json"
# tiny_models family name -> what the builder was given; gpt2 is not a builder family
BUILDER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")
PRECISIONS = ("fp32", "int4")
# The builder sizes its RoPE cos/sin tables by max_position_embeddings (131072 for Mistral: 9 MB of fixture);
# 256 positions cover every test, and no tiny family uses a scaling that depends on it.
FIXTURE_POSITIONS = 256
# The builder takes any Linear with vocab_size outputs for the lm_head: Phi-3's fused gate_up_proj (2 x 128 = 256
# outputs) would be read as one, so its fixture gets a smaller FFN.
OVERRIDES: dict[str, dict] = {"phi3": {"intermediate_size": 96}}


def fixture_checkpoint(family: str, folder: Path) -> Path:
    """The tiny checkpoint a fixture was built from: ``tiny_checkpoints.save_checkpoint`` with short RoPE tables."""
    from tiny_checkpoints import save_checkpoint

    save_checkpoint(family, folder, overrides=OVERRIDES.get(family))
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["max_position_embeddings"] = FIXTURE_POSITIONS
    if "original_max_position_embeddings" in config:
        config["original_max_position_embeddings"] = FIXTURE_POSITIONS
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def weights_digest(folder: Path) -> str:
    """sha256 over the checkpoint's tensors (name, dtype, shape, bytes), independent of file layout."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fixture_dir(family: str, precision: str) -> Path:
    return FIXTURES / f"{family}-{precision}"


def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8")) if MANIFEST.is_file() else {}
