"""How far the quality ``optimize`` prints is from what other text of the same source measures.

``optimize`` states the perplexity ratio to dense on held-out windows of the calibration text
(``calibration.text.split_stream``: the end of the text, in a share no calibration window reads). This measures,
in ONNX Runtime, the ratio of an ``optimize`` output to its dense export on three sets of windows of one length:

- ``held out``: the windows ``optimize`` measured (``--heldout-windows``, 16 by default);
- ``calibration``: the calibration windows themselves, the text every fit saw;
- ``other``: ``--windows`` windows spread over other text of the same source (default: C4's second half).

A standard error per set (of the mean per-window log-ratio) says what the window count alone explains. Until
2026-12-07 the held-out windows lay in the gaps between the calibration windows; this script's first version
measured those (rows ``gaps`` in the results), and they read 5-22% below other text of the same source.

    python benchmarks/heldout_agreement.py OUT --reference DENSE_EXPORT [--calibration TEXT] [--other TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from subfit_onnx.calibration.text import calibration_split, load_documents, token_windows, tokenize_documents
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.logprobs import token_logprobs

REPO = Path(__file__).resolve().parents[1]


def window_nll(decoder: OnnxDecoder, windows: np.ndarray) -> np.ndarray:
    """Mean next-token NLL of each window, scored as ``evaluate`` scores it (one prefill, after BOS when led by it)."""
    return np.array([-float(token_logprobs(decoder.forward(w[None, :]).logits[0, :-1], w[1:]).mean()) for w in windows])


def summarise(dense: np.ndarray, model: np.ndarray) -> dict[str, float]:
    log_ratio = model - dense
    return {"ratio": round(float(np.exp(model.mean() - dense.mean())), 4),
            "se_log": round(float(log_ratio.std(ddof=1) / np.sqrt(log_ratio.size)), 4),
            "dense_ppl": round(float(np.exp(dense.mean())), 3), "windows": int(dense.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="an optimize output folder")
    ap.add_argument("--reference", type=Path, required=True, help="the dense export it came from")
    ap.add_argument("--calibration", type=Path, default=REPO / "assets" / "text" / "c4_first_half.txt")
    ap.add_argument("--other", type=Path, default=REPO / "assets" / "text" / "c4_second_half.txt")
    ap.add_argument("--num-samples", type=int, default=64, help="as optimize ran")
    ap.add_argument("--seq-len", type=int, default=256, help="as optimize ran")
    ap.add_argument("--heldout-windows", type=int, default=16, help="as optimize ran")
    ap.add_argument("--windows", type=int, default=48, help="windows of the other text")
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()

    dense, model = OnnxDecoder(args.reference), OnnxDecoder(args.output)
    split = calibration_split(dense.tokenizer, args.calibration, args.num_samples, args.seq_len, args.heldout_windows)
    if split.heldout is None:
        raise SystemExit("the calibration text is too short to hold windows out")
    other = token_windows(tokenize_documents(dense.tokenizer, load_documents(args.other)), args.windows, args.seq_len,
                          split.bos)
    sets = {"held out": split.heldout, "calibration": split.tokens, "other": other}
    rows = {name: summarise(window_nll(dense, w), window_nll(model, w)) for name, w in sets.items()}
    print(f"{'windows':22s} {'ratio':>7s} {'se(log)':>8s} {'dense ppl':>10s} {'n':>4s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['ratio']:7.3f} {r['se_log']:8.3f} {r['dense_ppl']:10.2f} {r['windows']:4d}")
    if args.save:  # runs accumulate: the file keeps the gap windows' runs beside today's
        runs = json.loads(args.save.read_text())["runs"] if args.save.exists() else []
        runs.append({"held_out": "the end of the calibration text (split_stream)", "output": str(args.output),
                     "reference": str(args.reference), "calibration": str(args.calibration), "other": str(args.other),
                     "window_len": args.seq_len, "rows": rows})
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps({"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
