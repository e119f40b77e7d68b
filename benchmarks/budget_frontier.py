"""The budget frontier: held-out perplexity ratio against measured decode-time ratio, per objective.

For one real model: SubFit with the parameter budget (``--sparsity``), the latency budget (``--target-speedup``)
and the KV budget (``--kv-budget``), each through ``subfit_onnx.optimize`` exactly as users run it, plus ShortGPT
layer drop at the same parameter fractions. Every compressed model is then measured the same way:

- perplexity on held-out Wikipedia (the second half of wiki.utf8's articles), ``--windows`` x 512-token windows,
  BOS-led when the tokenizer adds BOS, ratio to the dense export;
- decode ms/token at context 512 interleaved with the dense export in one process (``unit_costs.decode_ratio``);
- KV bytes per token.

With ``--quantize int4`` every model is written with ``--quantize int4`` (unit costs timed on int4 graphs), and
decode ratios are to the dense export quantized the same way; perplexity ratios stay to dense fp32, and the
dense int4 model's own ratio is recorded beside them.

Writes ``benchmarks/results/budget_frontier_<model>[_int4].json`` and prints a table; with ``--merge`` the rows of
requests not re-run (``--points``, ``--layer-drop``) stay in it, each SubFit row recording the score and weighting
it ran with.

    python benchmarks/budget_frontier.py [--model smollm2|gemma3] [--assets assets] [--export DENSE_EXPORT]
        [--quantize int4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from subfit_onnx import SubFitConfig, optimize, rewrite
from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.text import load_documents
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.perplexity import make_windows, window_perplexity
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.unit_costs import decode_ratio, quantized_dense

POINTS: list[tuple[str, dict[str, float]]] = [
    ("params", {"sparsity": 0.125}), ("params", {"sparsity": 0.25}), ("params", {"sparsity": 0.375}),
    ("latency", {"target_speedup": 1.15}), ("latency", {"target_speedup": 1.3}), ("latency", {"target_speedup": 1.45}),
    ("kv", {"kv_budget": 0.75}), ("kv", {"kv_budget": 0.5}),
    ("quality", {"max_ppl_ratio": 1.3}),
]
_DENSE_PASS: dict[str, Any] = {}


def heldout_wiki(wiki: Path, work: Path) -> Path:
    docs = load_documents(wiki)
    out = work / "wiki_second_half.txt"
    out.write_text("\n\n".join(docs[len(docs) // 2 :]), encoding="utf-8")
    return out


def layer_drop(model_dir: Path, export: Path, tokens_source: Path, sparsity: float, out: Path,
               quantize: str | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_onnx.baselines import layer_drop_plan
    from subfit_onnx.calibration.calibrate import calibrate_model
    from subfit_onnx.calibration.text import calibration_tokens
    from subfit_onnx.plan import CalibratedPlan

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if "dense" not in _DENSE_PASS:  # Block Influence comes from pass 1, the same for every sparsity
        tokens = calibration_tokens(tokenizer, tokens_source, 64, 256)
        _DENSE_PASS["dense"] = calibrate_model(model, tokens, SubFitConfig(sparsity=sparsity)).dense
    dense = _DENSE_PASS["dense"]
    plan, tensors = layer_drop_plan(model, dense, sparsity)
    rewrite(export, CalibratedPlan(plan, tensors), out, overwrite=True, quantize=quantize)
    return out


def measure(dense: Path, path: Path, windows: Any, dense_ppl: float, quantize: str | None = None) -> dict[str, Any]:
    ppl = window_perplexity(OnnxDecoder(path), windows).perplexity
    decode = decode_ratio(dense, path, context=512, repeats=5, quantize=quantize)
    report = json.loads((path / "subfit_report.json").read_text()) if (path / "subfit_report.json").is_file() else {}
    kv = report.get("kv_bytes_per_token", {})
    return {"ppl_ratio": ppl / dense_ppl, "decode_ratio": decode["ratio"], "decode_ms": decode["compressed_ms"],
            "dense_decode_ms": decode["dense_ms"], "kv_ratio": kv["after"] / kv["before"] if kv else None,
            "achieved_sparsity": report.get("sparsity", {}).get("achieved"),
            "depth_map": report.get("depth_map"), "budget": report.get("budget"), "quality": report.get("quality")}


def merged_rows(old: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each re-run request replaced in place by its fresh row; new requests go at the end."""
    key = lambda row: (row["method"], json.dumps(row["request"], sort_keys=True))
    by_key = {key(r): r for r in fresh}
    out = [by_key.pop(key(r), r) for r in old]
    return out + [r for r in fresh if key(r) in by_key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--assets", default="assets")
    ap.add_argument("--export", type=Path, default=None, help="the dense export (default: exported into --work)")
    ap.add_argument("--work", type=Path, default=Path("work/budget_frontier"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--layer-drop", nargs="*", type=float, default=[0.125, 0.25, 0.375])
    ap.add_argument("--points", nargs="*", type=int, default=None, help="indices into POINTS (default: all)")
    ap.add_argument("--quantize", choices=("int4", "int8"), default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true",
                    help="keep the existing JSON's rows for requests not re-run (their settings say when they ran)")
    args = ap.parse_args()
    q = args.quantize
    out = Path(args.out or f"benchmarks/results/budget_frontier_{args.model}{f'_{q}' if q else ''}.json")
    saved = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    if saved.get("windows", args.windows) != args.windows:  # rows on other windows do not compare
        raise SystemExit(f"--merge: {out} was measured on {saved['windows']} windows, not {args.windows}")

    assets = fetch_assets(args.assets, gemma=args.model == "gemma3")
    model_dir = assets.model if args.model == "smollm2" else assets.gemma3
    work = args.work / (args.model + (f"-{q}" if q else ""))
    work.mkdir(parents=True, exist_ok=True)
    export = args.export or export_decoder(model_dir, work / "dense").parent
    wiki = heldout_wiki(assets.wiki, work)
    windows = make_windows(OnnxDecoder(export).tokenizer, wiki, args.windows, 512)
    dense_ppl = window_perplexity(OnnxDecoder(export), windows).perplexity
    dense_q_ratio = None
    if q is not None:  # what quantization alone costs, for reading the compressed rows
        dense_q = work / f"dense-{q}"
        if not dense_q.is_dir():
            quantized_dense(export / "model.onnx", q, dense_q)
        dense_q_ratio = window_perplexity(OnnxDecoder(dense_q), windows).perplexity / dense_ppl
        print(f"dense {q}: ppl x{dense_q_ratio:.3f}", flush=True)
    rows: list[dict[str, Any]] = []
    points = POINTS if args.points is None else [POINTS[i] for i in args.points]
    for objective, request in points:
        name = "-".join(f"{k}{v:g}" for k, v in request.items())
        t0 = time.perf_counter()
        kwargs = {k: v for k, v in request.items() if k != "sparsity"}
        config = SubFitConfig(calibration=str(assets.c4_calibration))
        result = optimize(export, request.get("sparsity"), model=model_dir, config=config, output=work / name,
                          overwrite=True, warn_ppl_ratio=None, quantize=q, **kwargs)
        row = {"method": "subfit", "objective": objective, "request": request,
               "settings": {"score": result.plan.method.score, "weighting": result.plan.calibration.get("weighting")},
               "optimize_seconds": time.perf_counter() - t0, **measure(export, result.output, windows, dense_ppl, q)}
        rows.append(row)
        print(f"{objective:8s} {name:22s} ppl x{row['ppl_ratio']:.3f}  decode {row['decode_ratio']:.3f}  "
              f"kv {row['kv_ratio']}", flush=True)
    for s in args.layer_drop:
        path = layer_drop(model_dir, export, assets.c4_calibration, s, work / f"layer_drop-{s:g}", q)
        row = {"method": "layer_drop", "objective": "params", "request": {"sparsity": s},
               **measure(export, path, windows, dense_ppl, q)}
        rows.append(row)
        print(f"layer drop {s:g}: ppl x{row['ppl_ratio']:.3f}  decode {row['decode_ratio']:.3f}", flush=True)
    rows = merged_rows(saved.get("rows", []), rows)
    saved.update({"model": args.model, "quantize": q, "dense_quantized_ppl_ratio": dense_q_ratio,
                  "dense_ppl": dense_ppl, "windows": args.windows, "window_len": 512,
                  "bos_led": windows.bos is not None, "rows": rows})
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print("\n| method | objective | request | ppl ratio | decode ratio | KV ratio | sparsity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        req = ", ".join(f"{k}={v:g}" for k, v in r["request"].items())
        kv = f"{r['kv_ratio']:.3f}" if r["kv_ratio"] is not None else "-"
        sp = f"{r['achieved_sparsity']:.1%}" if r["achieved_sparsity"] is not None else "-"
        print(f"| {r['method']} | {r['objective']} | {req} | {r['ppl_ratio']:.3f} | {r['decode_ratio']:.3f} | "
              f"{kv} | {sp} |")


if __name__ == "__main__":
    main()
