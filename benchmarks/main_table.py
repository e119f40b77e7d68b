"""The main table: SubFit against layer-level baselines on SmolLM2-135M-Instruct (or ``--model gemma3``:
Gemma-3-270m), all as ONNX models in ORT.

One command reproduces it (about an hour on 2 CPU cores; steps already done in --work are reused):

    python benchmarks/main_table.py [--model smollm2|gemma3] [--assets assets] [--work assets/bench]

After a SubFit default changes, ``--methods subfit`` rebuilds and re-measures the SubFit rows alone (delete
<work>/subfit-* first): a row whose export is built in a run is measured afresh, every other row stays as saved.

- Calibration: the first half of exllamav2's c4.utf8, 64 x 256 tokens, shared by every method.
- Perplexity: held-out windows of wiki.utf8 and of the second half of c4.utf8 (48 windows x 256 tokens each,
  spread evenly over the text), ONNX Runtime CPU EP. Windows are cut as deployed (``subfit-onnx evaluate``):
  BOS-led and scored after BOS when the tokenizer adds one (Gemma), from their first token otherwise (SmolLM2).
- Accuracy: length-normalised multiple-choice accuracy on the first 200 items of each BIG-bench set that
  ``subfit-onnx fetch-assets`` writes to <assets>/mc (social_iqa, goal_inference);
  retention is the mean over both sets of (model acc_norm / dense acc_norm).
- Speed: prefill 128/512, per-token decode at context 512 and KV bytes, candidate and dense interleaved in one
  process (``subfit_onnx.evaluation.benchmark``); ratios to dense.
- Rows: dense; at each sparsity SubFit (default config), layer drop (ShortGPT), ReplaceMe (contiguous block +
  linear map), submodule drop (SubFit's selection, no bypass) and a layer-truncated model with the same parameter
  count (the physical floor for speed; exported the same way).

Writes benchmarks/results/main_table[_gemma3].{json,md} and, for SmolLM2, three PNG plots.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.assets import fetch_assets
from subfit_onnx.baselines import drop_bypasses, layer_drop_plan, replaceme_plan
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.text import calibration_tokens
from subfit_onnx.config import SubFitConfig
from subfit_onnx.evaluation.benchmark import BenchmarkSettings, run_benchmark
from subfit_onnx.evaluation.evaluate import evaluate_export
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.exporters.rewrite import rewrite_export
from subfit_onnx.plan import save_plan

REPO = Path(__file__).resolve().parents[1]
METHODS = ("subfit", "layer_drop", "replaceme", "submodule_drop", "truncated")
PLANNED = ("subfit", "submodule_drop", "layer_drop", "replaceme")  # the rows a plan describes, in the order built


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def truncated_export(model_dir: Path, keep_layers: int, out: Path, work: Path) -> Path:
    """The first ``keep_layers`` layers only, saved and exported exactly like the dense model."""
    if (out / "model.onnx").exists():
        return out
    model = _load(model_dir)
    model.model.layers = model.model.layers[:keep_layers]
    model.config.num_hidden_layers = keep_layers
    if getattr(model.config, "layer_types", None):  # Gemma-3: sliding/full attention per layer
        model.config.layer_types = model.config.layer_types[:keep_layers]
    hf_dir = work / f"hf-truncated-{keep_layers}"
    model.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(hf_dir)
    return export_decoder(hf_dir, out)


def _method_plan(method: str, result: Any, model: torch.nn.Module, model_dir: Path, tokens: Any,
                 sparsity: float) -> tuple[Any, Any]:
    if method == "subfit":
        return result.plan, result.tensors
    if method == "submodule_drop":
        return drop_bypasses(result.plan, result.tensors)
    if method == "layer_drop":
        return layer_drop_plan(model, result.dense, sparsity)
    return replaceme_plan(_load(model_dir), tokens, sparsity)


def build_models(args: argparse.Namespace, assets: Any, work: Path, log: dict) -> tuple[dict[str, Path], set[str]]:
    """The exports to measure (``args.methods`` at each sparsity, and dense) and the names of those built now.

    A row whose export is built now was measured on another model, if at all, so its cached figures are stale.
    """
    model_dir = args.model_dir
    dense_dir = work / "dense"
    if not (dense_dir / "model.onnx").exists():
        export_decoder(model_dir, dense_dir)
    models = {"dense": dense_dir}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = calibration_tokens(tokenizer, assets.c4_calibration, args.num_samples, 256)
    dense_pass = None
    built: set[str] = set()
    for s in args.sparsities:
        pct = f"{round(s * 1000) / 10:g}"
        targets = {m: work / f"{m}-{pct}" for m in args.methods}
        if all((p / "model.onnx").exists() for p in targets.values()):
            models.update({f"{m}@{s}": p for m, p in targets.items()})
            continue
        model = _load(model_dir)
        t0 = time.perf_counter()
        result = calibrate_model(model, tokens, SubFitConfig(sparsity=s, num_samples=args.num_samples),
                                 dense=dense_pass)
        log.setdefault("calibration_seconds", {})[str(s)] = time.perf_counter() - t0
        dense_pass = result.dense
        for method in (m for m in PLANNED if m in targets):
            plan, tensors = _method_plan(method, result, model, model_dir, tokens, s)
            save_plan(plan, tensors, work / "plans" / f"{method}-{pct}")
            if not (targets[method] / "model.onnx").exists():
                rewrite_export(dense_dir, plan, tensors, targets[method], overwrite=True)
                built.add(f"{method}@{s}")
            log.setdefault("plans", {})[f"{method}@{s}"] = {
                "depth_map": plan.depth_map(), "achieved": plan.sparsity.achieved, "net": plan.sparsity.net}
        if "truncated" in targets and not (targets["truncated"] / "model.onnx").exists():
            keep = round(result.plan.model.num_layers * (1 - result.plan.sparsity.achieved))
            truncated_export(model_dir, keep, targets["truncated"], work)
            built.add(f"truncated@{s}")
            log.setdefault("plans", {})[f"truncated@{s}"] = {"keep_layers": keep}
        models.update({f"{m}@{s}": p for m, p in targets.items()})
    return models, built


def measure(models: dict[str, Path], assets: Any, args: argparse.Namespace, cache: dict) -> dict[str, dict]:
    tasks = sorted(assets.mc_tasks())
    settings = BenchmarkSettings(repeats=args.repeats)
    for name, path in models.items():
        row = cache.setdefault(name, {})
        if "wiki_ppl" not in row:
            wiki = evaluate_export(path, text=assets.wiki, tasks=tasks, limit=args.mc_limit, windows=args.windows)
            row["wiki_ppl"] = wiki["model"]["perplexity"]["perplexity"]
            row["acc_norm"] = {t: r["acc_norm"] for t, r in wiki["model"]["tasks"].items()}
            c4 = evaluate_export(path, text=assets.c4_heldout, windows=args.windows)
            row["c4_ppl"] = c4["model"]["perplexity"]["perplexity"]
        if name != "dense" and "speed" not in row and not args.skip_speed:
            report = run_benchmark(path, models["dense"], settings)
            row["speed"] = report.ratios
            row["kv_bytes_per_token"] = report.candidate.kv_bytes_per_token
            row["dense_kv_bytes_per_token"] = report.reference.kv_bytes_per_token
            row["file_bytes"] = report.candidate.file_bytes
        yield name, row


def _retention(row: dict, dense: dict) -> float:
    """Mean over the multiple-choice sets of acc_norm / dense acc_norm."""
    return sum(row["acc_norm"][t] / dense["acc_norm"][t] for t in dense["acc_norm"]) / len(dense["acc_norm"])


def _ratio(speed: dict, key: str) -> str:
    return f"{speed[key]:.3f}" if key in speed else "-"


def _row_order(item: tuple[str, dict]) -> tuple[float, int]:
    method, _, s = item[0].partition("@")
    return (float(s or 0), METHODS.index(method) if method in METHODS else -1)


def table(rows: dict[str, dict]) -> str:
    dense = rows["dense"]
    head = ("| model | sparsity | wiki ppl ratio | c4 ppl ratio | acc retention | prefill-128 | prefill-512 | "
            "decode@512 | KV bytes |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in sorted(rows.items(), key=_row_order):
        method, _, s = name.partition("@")
        retention = _retention(r, dense)
        sp = r.get("speed") or {}
        kv = r["kv_bytes_per_token"] / r["dense_kv_bytes_per_token"] if "kv_bytes_per_token" in r else 1.0
        lines.append(f"| {method} | {s or '0'} | {r['wiki_ppl'] / dense['wiki_ppl']:.3f} | "
                     f"{r['c4_ppl'] / dense['c4_ppl']:.3f} | {retention:.3f} | {_ratio(sp, 'prefill_128_ms')} | "
                     f"{_ratio(sp, 'prefill_512_ms')} | {_ratio(sp, 'decode_512_ms_per_token')} | {kv:.3f} |")
    return "\n".join(lines)


def plots(rows: dict[str, dict], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    dense = rows["dense"]
    series: dict[str, list[tuple[float, dict]]] = {}
    for name, r in rows.items():
        if "@" in name:
            method, s = name.split("@")
            series.setdefault(method, []).append((float(s), r))
    metrics = {
        "ppl_ratio_vs_sparsity.png": ("wiki perplexity / dense (log)", lambda r: r["wiki_ppl"] / dense["wiki_ppl"], True),
        "accuracy_retention_vs_sparsity.png": ("acc_norm retention", lambda r: _retention(r, dense), False),
        "decode_latency_vs_sparsity.png": ("decode@512 latency / dense",
                                           lambda r: (r.get("speed") or {}).get("decode_512_ms_per_token", float("nan")), False),
    }
    written = []
    for fname, (label, fn, log) in metrics.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [fn(p[1]) for p in pts], marker="o", label=method)
        ax.set_xlabel("sparsity (fraction of block parameters removed)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=str(REPO / "assets"))
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--work", default=None, help="where exports go (default: <assets>/bench[-gemma3])")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.125, 0.25, 0.375])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="rows to build and measure (the other rows stay as saved), e.g. subfit after a default "
                    "changed")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--mc-limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--remeasure-speed", action="store_true",
                    help="drop cached speed ratios so every row is timed again in this run (same conditions)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--note", default="", help="what this run measured afresh, kept in the JSON's settings")
    args = ap.parse_args()

    assets = fetch_assets(args.assets, gemma=args.model == "gemma3")
    args.model_dir = assets.model if args.model == "smollm2" else assets.gemma3
    suffix = "" if args.model == "smollm2" else f"_{args.model}"
    work = Path(args.work) if args.work else assets.root / f"bench{suffix.replace('_', '-')}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"main_table{suffix}.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    log = saved.get("log", {})
    models, built = build_models(args, assets, work, log)
    rows = saved.get("rows", {})
    for name in built:
        rows.pop(name, None)
    if args.remeasure_speed:
        for row in rows.values():
            row.pop("speed", None)
    for name, _ in measure(models, assets, args, rows):
        json_path.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}, "log": log, "rows": rows},
                                        indent=2))
        print(f"measured {name}", flush=True)
    md = table(rows)
    (out_dir / f"main_table{suffix}.md").write_text(md + "\n")
    pngs = plots(rows, out_dir) if not suffix else []
    print(md)
    print(f"wrote {json_path}, main_table{suffix}.md and {', '.join(pngs) or 'no plots'}")


if __name__ == "__main__":
    main()
