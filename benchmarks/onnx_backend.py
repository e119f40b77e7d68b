"""The ONNX Runtime calibration backend against the PyTorch one on a real model: cost, agreement, quality.

Each calibration runs in its own subprocess so its wall time, CPU time and peak RSS (``ru_maxrss``) are its own:

* ``torch``  : ``calibrate_model`` on the fp32 checkpoint;
* ``onnx``   : ``calibrate_export`` on the fp32 Optimum export (no checkpoint, no torch imported);
* ``onnx16`` : ``calibrate_export`` on the fp16 export (``export_decoder(..., dtype="fp16")``).

Same tokens for all (N x L from c4_first_half.txt), default ``SubFitConfig`` otherwise. Then one plain ONNX
Runtime forward of the fp32 export over the same tokens (the cost yardstick), the selection agreement and bypass
weight differences between the torch and onnx plans, and held-out perplexity on wiki.utf8 windows with ONNX
Runtime: each plan rewrites the export it was made for (the torch plan rewrites the fp32 export, as
``optimize --model`` would) and the ratio to the same export's dense perplexity is reported.

    python benchmarks/onnx_backend.py                     # 64 x 256, 24 windows; writes results/onnx_backend.json
    python benchmarks/onnx_backend.py --num-samples 32 --skip fp16
    python benchmarks/onnx_backend.py --model gemma3 --skip fp16 --save benchmarks/results/onnx_backend_gemma3.json

Machines shared with other jobs inflate wall time: each calibration runs ``--repeats`` times, interleaved across
backends, and the median is reported with every run; CPU seconds (user + system, all threads) are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "onnx_backend.json"
RUNS = {"torch": "fp32", "onnx": "fp32", "onnx16": "fp16"}
MODELS = {  # --model: (checkpoint folder, export prefix under assets/onnx, name in the results)
    "smollm2": ("smollm2-135m-instruct", "smollm2", "SmolLM2-135M-Instruct"),
    "gemma3": ("gemma-3-270m", "gemma3", "Gemma-3-270m"),
}


def _checkpoint(args: argparse.Namespace) -> Path:
    return args.assets / MODELS[args.model][0]


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(r.ru_utime + r.ru_stime, 1), "peak_rss_mb": round(r.ru_maxrss / 1024, 1)}


def write_tokens(args: argparse.Namespace, path: Path) -> None:
    """Tokenized once by the driver, so every stage sees the same ids and no stage imports transformers (and
    with it torch) just to tokenize: the onnx stages' peak RSS is the backend's own."""
    import numpy as np
    from transformers import AutoTokenizer

    from subfit_onnx.calibration.text import calibration_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(_checkpoint(args)))
    np.save(path, calibration_tokens(tokenizer, args.assets / "text" / "c4_first_half.txt", args.num_samples,
                                     args.seq_len))


def _tokens(args: argparse.Namespace):
    import numpy as np

    return np.load(args.tokens)


def _export_dir(args: argparse.Namespace, dtype: str) -> Path:
    return args.assets / "onnx" / f"{MODELS[args.model][1]}-{dtype}"


# ---- stages (each in a fresh interpreter) ---------------------------------------------------------------------
def stage_export(args: argparse.Namespace) -> dict:
    from subfit_onnx.exporters.optimum_export import export_decoder

    folder = _export_dir(args, args.dtype)
    if (folder / "model.onnx").is_file():
        return {"reused": str(folder)}
    start = time.perf_counter()
    export_decoder(_checkpoint(args), folder, dtype=args.dtype)
    return {"exported": str(folder), "seconds": round(time.perf_counter() - start, 1)}


def stage_calibrate(args: argparse.Namespace) -> dict:
    """Token loading happens before the clock starts; model loading is part of the measured calibration."""
    from subfit_onnx.config import SubFitConfig
    from subfit_onnx.plan import save_plan

    tokens = _tokens(args)
    config = SubFitConfig(sparsity=args.sparsity, num_samples=args.num_samples, seq_len=args.seq_len,
                          ffn_bypass=args.ffn_bypass)
    before = _usage()
    start = time.perf_counter()
    extra: dict = {}
    if args.run == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        from subfit_onnx.calibration.calibrate import calibrate_model

        model = AutoModelForCausalLM.from_pretrained(str(_checkpoint(args)), dtype=torch.float32)
        result = calibrate_model(model.eval(), tokens, config)
        extra["torch_threads"] = torch.get_num_threads()
    else:  # what calibrate_export does, keeping the runner to read its time split
        from subfit_onnx.calibration.calibrate import run_calibration
        from subfit_onnx.calibration.onnx_backend import OrtLayerRunner

        runner = OrtLayerRunner(_export_dir(args, RUNS[args.run]), tokens, config.batch_size)
        try:
            result = run_calibration(runner, config)
        finally:
            runner.close()
        times = runner.times
        extra["seconds_by_kind"] = {k: round(getattr(times, k), 1) for k in ("load", "build", "graph", "statistics")}
        extra["sessions_built"] = times.counts.get("build", 0)
        extra["torch_imported"] = "torch" in sys.modules
        extra["providers"] = runner.providers
    wall = time.perf_counter() - start
    save_plan(result.plan, result.tensors, args.out)
    after = _usage()
    return {"wall_s": round(wall, 1), "cpu_s": round(after["cpu_s"] - before["cpu_s"], 1),
            "peak_rss_mb": after["peak_rss_mb"], "depth_map": result.plan.depth_map(),
            "ffns_with_neurons": [u.layer for u in result.plan.removed_units("mlp") if u.bypass.form == "neurons"],
            "removed": [u.key for u in result.plan.removed], "achieved": result.plan.sparsity.achieved, **extra}


def stage_forward(args: argparse.Namespace) -> dict:
    """One no-cache ONNX Runtime forward of the fp32 export over the calibration tokens (batches of 8)."""
    from subfit_onnx.evaluation.decoder import OnnxDecoder

    tokens = _tokens(args)
    decoder = OnnxDecoder(_export_dir(args, "fp32"))
    decoder.forward(tokens[:1, :8])
    before = _usage()
    start = time.perf_counter()
    for i in range(0, tokens.shape[0], 8):
        decoder.forward(tokens[i : i + 8])
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(_usage()["cpu_s"] - before["cpu_s"], 1)}


def stage_perplexity(args: argparse.Namespace) -> dict:
    """Dense and compressed perplexity of one export; each plan folder is rewritten onto it first."""
    from subfit_onnx.evaluation.decoder import OnnxDecoder
    from subfit_onnx.evaluation.perplexity import make_windows, window_perplexity
    from subfit_onnx.exporters.rewrite import rewrite_export
    from subfit_onnx.plan import load_plan

    export = _export_dir(args, args.dtype)
    dense = OnnxDecoder(export)
    windows = make_windows(dense.tokenizer, args.assets / "text" / "wiki.utf8", args.windows, args.seq_len)
    base = window_perplexity(dense, windows).perplexity
    out = {"dense": round(base, 4), "windows": args.windows, "window_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        for plan_dir in args.plans:
            plan, tensors = load_plan(plan_dir)
            target = Path(tmp) / Path(plan_dir).name
            rewrite_export(export, plan, tensors, target)
            ppl = window_perplexity(OnnxDecoder(target), windows).perplexity
            out[Path(plan_dir).name] = {"perplexity": round(ppl, 4), "ratio": round(ppl / base, 4)}
    return out


def agreement(torch_plan: Path, onnx_plan: Path) -> dict:
    """Same units? And for units both removed, relative Frobenius error of the bypass matrix and bias."""
    import numpy as np

    from subfit_onnx.plan import load_plan

    (a, ta), (b, tb) = load_plan(torch_plan), load_plan(onnx_plan)
    keys_a, keys_b = [u.key for u in a.removed], [u.key for u in b.removed]

    def matrix(t: dict, key: str):
        return t[f"{key}.weight"] if f"{key}.weight" in t else t[f"{key}.down"] @ t[f"{key}.up"]

    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))
    common = [k for k in keys_a if k in keys_b]
    w = [rel(matrix(tb, k), matrix(ta, k)) for k in common]
    bias = [rel(tb[f"{k}.bias"], ta[f"{k}.bias"]) for k in common]
    shared = [name for name in ta if name in tb and name.rsplit(".", 1)[0] in common]
    every = [rel(tb[name], ta[name]) for name in shared if np.linalg.norm(ta[name]) > 0]
    forms = {u.key: u.bypass.form for u in a.removed}
    return {"same_selection": keys_a == keys_b, "common_units": len(common),
            "same_forms": all(forms.get(u.key) == u.bypass.form for u in b.removed if u.key in common),
            "tensor_rel_err_max": max(every, default=0.0),
            "only_torch": sorted(set(keys_a) - set(keys_b)), "only_onnx": sorted(set(keys_b) - set(keys_a)),
            "weight_rel_err_max": max(w, default=0.0), "weight_rel_err_median": float(np.median(w)) if w else 0.0,
            "bias_rel_err_max": max(bias, default=0.0)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else round((ordered[mid - 1] + ordered[mid]) / 2, 1)


# ---- driver -------------------------------------------------------------------------------------------------------
def _stage(args: argparse.Namespace, name: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--assets", str(args.assets), "--model", args.model, "--num-samples",
           str(args.num_samples), "--seq-len", str(args.seq_len), "--windows", str(args.windows),
           "--sparsity", str(args.sparsity), "--ffn-bypass", args.ffn_bypass, "--tokens", str(args.tokens), *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("export", "calibrate", "forward", "perplexity"))
    parser.add_argument("--assets", type=Path, default=Path(os.environ.get("SUBFIT_ASSETS", REPO / "assets")))
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--ffn-bypass", choices=("linear", "neurons", "auto"), default="auto",
                        help="FFN bypass shape for every calibration (the default config's is auto)")
    parser.add_argument("--repeats", type=int, default=2, help="calibrations per backend (median reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("fp16", "perplexity"))
    parser.add_argument("--run", choices=tuple(RUNS))
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plans", nargs="*", default=[])
    parser.add_argument("--tokens", type=Path, help="(stages) the .npy of calibration tokens")
    parser.add_argument("--save", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.assets = args.assets.resolve()

    if args.stage:
        stage = {"export": stage_export, "calibrate": stage_calibrate, "forward": stage_forward,
                 "perplexity": stage_perplexity}[args.stage]
        print(json.dumps(stage(args)))
        return

    from subfit_onnx.assets import fetch_assets

    fetch_assets(args.assets, gemma=args.model == "gemma3")
    runs = [r for r in RUNS if not (r == "onnx16" and "fp16" in args.skip)]
    result: dict = {"model": MODELS[args.model][2], "num_samples": args.num_samples, "seq_len": args.seq_len,
                    "sparsity": args.sparsity, "ffn_bypass": args.ffn_bypass, "cpu_count": os.cpu_count(),
                    "exports": {}, "calibration": {}}
    with tempfile.TemporaryDirectory(prefix="subfit-onnx-backend-") as tmp:
        plans = {run: Path(tmp) / f"plan-{run}" for run in runs}
        args.tokens = Path(tmp) / "tokens.npy"
        write_tokens(args, args.tokens)
        for dtype in sorted({RUNS[r] for r in runs}):
            result["exports"][dtype] = _stage(args, "export", "--dtype", dtype)
        measured: dict[str, list[dict]] = {run: [] for run in runs}
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every backend
            for run in runs:
                measured[run].append(_stage(args, "calibrate", "--run", run, "--out", str(plans[run])))
                print(run, measured[run][-1], flush=True)
        for run, runs_of in measured.items():
            result["calibration"][run] = {
                **runs_of[-1], "wall_s": _median([m["wall_s"] for m in runs_of]),
                "cpu_s": _median([m["cpu_s"] for m in runs_of]),
                "peak_rss_mb": max(m["peak_rss_mb"] for m in runs_of),
                "wall_s_runs": [m["wall_s"] for m in runs_of], "cpu_s_runs": [m["cpu_s"] for m in runs_of]}
        result["forward_onnx_fp32"] = forward = _stage(args, "forward")
        for run in runs:
            cal = result["calibration"][run]
            cal["wall_over_forward"] = round(cal["wall_s"] / forward["wall_s"], 2)
            cal["cpu_over_forward"] = round(cal["cpu_s"] / forward["cpu_s"], 2)
            if "seconds_by_kind" in cal:  # ONNX Runtime's own share, in forward passes
                cal["graph_over_forward"] = round(cal["seconds_by_kind"]["graph"] / forward["wall_s"], 2)
        result["agreement_torch_vs_onnx"] = agreement(plans["torch"], plans["onnx"])
        if "onnx16" in runs:
            result["agreement_onnx_fp32_vs_fp16"] = agreement(plans["onnx"], plans["onnx16"])
        if "perplexity" not in args.skip:
            result["perplexity_fp32"] = _stage(args, "perplexity", "--dtype", "fp32", "--plans",
                                               str(plans["torch"]), str(plans["onnx"]))
            ratios = {k: result["perplexity_fp32"][f"plan-{k}"]["ratio"] for k in ("torch", "onnx")}
            result["ratio_onnx_over_torch"] = round(ratios["onnx"] / ratios["torch"], 4)
            if "onnx16" in runs:
                result["perplexity_fp16"] = _stage(args, "perplexity", "--dtype", "fp16", "--plans",
                                                   str(plans["onnx16"]), str(plans["onnx"]))
                result["ratio_fp16_over_fp32"] = round(
                    result["perplexity_fp16"]["plan-onnx16"]["ratio"] / ratios["onnx"], 4)
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("exports",)}, indent=2))


if __name__ == "__main__":
    main()
