"""Which score, schedule, token weighting and bypass shape SubFit uses by default: measured, not guessed.

SmolLM2-135M-Instruct (or ``--model gemma3``: Gemma-3-270m, fetched on first use as ``fetch-assets --gemma`` does) in
PyTorch, calibrated on the first half of exllamav2's c4.utf8 (64 x 256 tokens), perplexity on held-out windows of
wiki.utf8 and of the second half of c4.utf8 (48 windows x 256 tokens each). Windows are cut as deployed: BOS-led
when the tokenizer adds BOS (Gemma), plain text otherwise (SmolLM2). Writes
benchmarks/results/method_variants[_gemma3].json and prints a table.

    python benchmarks/method_variants.py [--model smollm2|gemma3] [--assets assets] [--sparsities 0.25] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.text import (
    calibration_tokens,
    leading_bos,
    load_documents,
    token_windows,
    tokenize_documents,
)
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.torch_eval import torch_perplexity

VARIANTS: dict[str, dict] = {
    "default": {},
    "score=replaceability": {"score": "replaceability"},
    "score=contribution": {"score": "contribution"},
    "schedule=oneshot": {"schedule": "oneshot"},
    "weighting=uniform": {"weighting": "uniform"},
    "weighting=skip_first": {"weighting": "skip_first"},
    "attention_rank=full": {"attention_rank": Portion()},
    "mlp_rank=1/4": {"mlp_rank": Portion(fraction=0.25)},
    "ridge=1e-4": {"ridge": 1e-4},
    "ridge=1e-2": {"ridge": 1e-2},
    "no bypass (submodule drop)": {"bypass": False},
    "target=dense_stream": {"target": "dense_stream"},
    "prior_samples=1/4": {"prior_samples": Portion(fraction=0.25)},
    "prior_samples=1/2": {"prior_samples": Portion(fraction=0.5)},
    "ridge=1": {"ridge": 1.0},
    "ridge=0.3": {"ridge": 0.3},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="assets")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.25])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/method_variants[_gemma3].json")
    args = ap.parse_args()

    assets = fetch_assets(args.assets, mc=False, gemma=args.model == "gemma3")
    model_dir = assets.model if args.model == "smollm2" else assets.gemma3
    out_default = "method_variants.json" if args.model == "smollm2" else f"method_variants_{args.model}.json"
    args.out = args.out or f"benchmarks/results/{out_default}"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cal = calibration_tokens(tok, assets.c4_calibration, args.num_samples, 256)
    bos = leading_bos(tok)
    evals = {name: token_windows(tokenize_documents(tok, load_documents(path)), args.eval_windows, 256, bos)
             for name, path in (("wiki", assets.wiki), ("c4_heldout", assets.c4_heldout))}
    dense_ppl = {name: torch_perplexity(model, w) for name, w in evals.items()}
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    done = {(r["variant"], r["sparsity"]) for r in rows}
    dense_cache: dict[tuple, object] = {}
    print(f"dense perplexity: {dense_ppl}")
    for sparsity in args.sparsities:
        for name in args.variants:
            if (name, sparsity) in done:
                continue
            config = SubFitConfig(sparsity=sparsity, num_samples=args.num_samples, **VARIANTS[name])
            key = (config.weighting, config.attention_rank, config.mlp_rank, config.ridge, config.prior_samples)
            t0 = time.perf_counter()
            result = calibrate_model(model, cal, config, keep_compressed=True, dense=dense_cache.get(key))
            seconds = time.perf_counter() - t0
            dense_cache[key] = result.dense
            ppl = {n: torch_perplexity(model, w) for n, w in evals.items()}
            row = {
                "variant": name, "sparsity": sparsity, "depth_map": result.plan.depth_map(),
                "achieved": result.plan.sparsity.achieved, "net": result.plan.sparsity.net,
                "bypass_params": result.plan.sparsity.bypass_params,
                "wiki_ppl_ratio": ppl["wiki"] / dense_ppl["wiki"],
                "c4_ppl_ratio": ppl["c4_heldout"] / dense_ppl["c4_heldout"],
                "calibration_seconds": seconds,
            }
            rows.append(row)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            print(f"{sparsity:6.3f} {name:28s} wiki x{row['wiki_ppl_ratio']:.3f} c4 x{row['c4_ppl_ratio']:.3f} "
                  f"net {row['net']:.3f} {row['depth_map']} {seconds:.0f}s", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({"model": str(model_dir), "bos_led": bos is not None,
                                "dense_ppl": dense_ppl, "calibration": {"source": "c4 first half",
                                "num_samples": args.num_samples, "seq_len": 256},
                                "eval": {"windows": args.eval_windows, "window": 256}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
