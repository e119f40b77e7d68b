"""How long a rewrite takes and how much memory it needs, on a model over 1B parameters stored with external data.

Each stage runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own: build a random-weight Llama
(default: TinyLlama's shape, 1.1B parameters), export it with Optimum (over 2 GB, so ``model.onnx`` plus
``model.onnx_data``), make a synthetic 25% plan (random bypasses at fitted scale; the rewrite's cost does not
depend on the values), rewrite, then load the result in ONNX Runtime and run a prefill to prove the file is
sound. ``--model`` runs the same stages on an existing HF folder (e.g. SmolLM2), optionally with a real
calibration (``--calibrate``) instead of the synthetic plan.

    python benchmarks/rewrite_scale.py                       # >1B random Llama, ~10 GB disk, several minutes
    python benchmarks/rewrite_scale.py --model assets/smollm2-135m-instruct --calibrate --label smollm2

Results go to ``benchmarks/results/rewrite_scale.json`` (one entry per label) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "rewrite_scale.json"
STAGES = ("build", "export", "plan", "rewrite", "verify", "parity")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- stages (each runs in a fresh interpreter) --------------------------------------------------------------
def stage_build(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # trained-model scale without a slow init: N(0, 1/fan_in) weights, noisy norms
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(work / "hf")
    return {"params": sum(p.numel() for p in model.parameters())}


def stage_export(args: argparse.Namespace, work: Path) -> dict:
    from subfit_onnx.exporters.optimum_export import export_decoder

    if args.export and args.external_input:  # the same export, weights moved into model.onnx_data
        import onnx_ir as ir

        src = Path(args.export)
        (work / "export").mkdir()
        for item in src.iterdir():
            if item.is_file() and "onnx" not in item.name:
                shutil.copy2(item, work / "export" / item.name)
        ir.save(ir.load(src / "model.onnx"), work / "export" / "model.onnx", external_data="model.onnx_data")
        return {"converted_to_external_data": str(src)}
    if args.export:  # reuse an existing export (e.g. the tests' cached SmolLM2 one) through a symlink
        (work / "export").symlink_to(Path(args.export).resolve(), target_is_directory=True)
        return {"reused": str(args.export)}
    source = Path(args.model) if args.model else work / "hf"
    path = export_decoder(source, work / "export")
    files = {p.name: p.stat().st_size for p in path.parent.iterdir() if "onnx" in p.name}
    return {"files": files}


def _identity(args: argparse.Namespace, work: Path):
    """The plan's model identity from config.json alone (no torch in this stage)."""
    from subfit_onnx.architectures import family_for
    from subfit_onnx.identity import ModelIdentity

    cfg = json.loads((work / "export" / "config.json").read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    ffn = cfg["intermediate_size"]
    return ModelIdentity(name_or_path=str(args.model or "random-llama"), model_type=cfg["model_type"],
                         family=family_for(cfg["model_type"]).name, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         attention_params_per_layer=2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim,
                         mlp_params_per_layer=3 * hidden * ffn)


def synthetic_plan(identity, sparsity: float, seed: int = 0):
    """Alternate FFN and attention removals from the top layers down until ``sparsity`` is reached."""
    import numpy as np

    from subfit_onnx.bypass import Bypass
    from subfit_onnx.names import unit_key
    from subfit_onnx.plan import Baseline, Plan, RemovedUnit, SparsityReport, bypass_spec, bypass_tensors

    rng = np.random.default_rng(seed)
    d, n = identity.hidden_size, identity.num_layers
    sizes = {"attention": identity.attention_params_per_layer, "mlp": identity.mlp_params_per_layer}
    block = n * (sizes["attention"] + sizes["mlp"])
    order = [(i, k) for i in range(n - 2, 0, -1) for k in ("mlp", "attention")] + [(0, "attention")]
    removed, tensors, gone = [], {}, 0
    for layer, kind in order:
        if gone >= sparsity * block:
            break
        if kind == "attention":
            rank = max(1, d // 8)
            bypass = Bypass(bias=0.05 * rng.standard_normal(d), down=rng.standard_normal((d, rank)) / np.sqrt(d),
                            up=0.5 * rng.standard_normal((rank, d)) / np.sqrt(rank))
        else:
            bypass = Bypass(bias=0.05 * rng.standard_normal(d), weight=0.5 * rng.standard_normal((d, d)) / np.sqrt(d))
        key = unit_key(layer, kind)
        tensors.update(bypass_tensors(key, bypass))
        removed.append(RemovedUnit(layer=layer, kind=kind, score=0.0, fit_error=0.1, stream_error=0.01,
                                   params_removed=sizes[kind], bypass=bypass_spec(key, bypass)))
        gone += sizes[kind]
    extra = sum(u.bypass.params for u in removed)
    removed.sort(key=lambda u: (u.layer, u.kind != "attention"))
    plan = Plan(model=identity, removed=removed, baseline=Baseline(name="synthetic"),
                sparsity=SparsityReport(target=sparsity, achieved=gone / block, removed_params=gone,
                                        bypass_params=extra, net=(gone - extra) / block, block_params=block))
    return plan, tensors


def stage_plan(args: argparse.Namespace, work: Path) -> dict:
    from subfit_onnx.plan import save_plan

    if args.calibrate:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from subfit_onnx.calibration.calibrate import calibrate_model
        from subfit_onnx.calibration.text import calibration_tokens
        from subfit_onnx.config import SubFitConfig

        config = SubFitConfig(sparsity=args.sparsity, num_samples=16, seq_len=128)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokens = calibration_tokens(tokenizer, args.text, config.num_samples, config.seq_len)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        result = calibrate_model(model, tokens, config)
        plan, tensors = result.plan, result.tensors
    else:
        plan, tensors = synthetic_plan(_identity(args, work), args.sparsity)
    save_plan(plan, tensors, work / "plan")
    return {"removed": [u.key for u in plan.removed], "achieved": plan.sparsity.achieved,
            "bypass_params": plan.sparsity.bypass_params, "calibrated": bool(args.calibrate)}


def stage_rewrite(args: argparse.Namespace, work: Path) -> dict:
    from subfit_onnx.exporters.rewrite import rewrite_export
    from subfit_onnx.plan import load_plan

    plan, tensors = load_plan(work / "plan")
    report = rewrite_export(work / "export", plan, tensors, work / "rewritten", overwrite=True)
    return {"report": report.model_dump()}


def stage_verify(args: argparse.Namespace, work: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    start = time.perf_counter()
    sess = ort.InferenceSession(str(work / "rewritten" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    feeds = {"input_ids": np.arange(1, 9, dtype=np.int64)[None], "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(8, dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    logits = sess.run(["logits"], feeds)[0]
    return {"session_load_seconds": load_s, "logits_finite": bool(np.isfinite(logits).all()),
            "logits_shape": list(logits.shape), "kv_inputs": sum(i.name.startswith("past") for i in sess.get_inputs())}


def stage_parity(args: argparse.Namespace, work: Path) -> dict:
    """With --model: ORT prefill/decode logits and 20 greedy tokens against the PyTorch reference."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_onnx.plan import load_plan
    from subfit_onnx.reference import apply_plan

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from rewrite_helpers import ort_prefill_decode, rel_diff, torch_prefill_decode

    plan, tensors = load_plan(work / "plan")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    reference = apply_plan(model.eval(), plan, tensors)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    enc = tokenizer("The history of the printing press begins in", return_tensors="pt")
    ids = enc["input_ids"].numpy()
    got = ort_prefill_decode(work / "rewritten" / "model.onnx", ids, ids[:, -1:])
    want = torch_prefill_decode(reference, ids, ids[:, -1:])
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    ort_tokens = ORTModelForCausalLM.from_pretrained(work / "rewritten").generate(**enc, **kwargs)
    ref_tokens = reference.generate(**enc, **kwargs)
    return {"prefill_rel_diff": rel_diff(got[0], want[0]), "decode_rel_diff": rel_diff(got[1], want[1]),
            "prefill_max_abs_diff": float(np.max(np.abs(got[0] - want[0]))),
            "decode_max_abs_diff": float(np.max(np.abs(got[1] - want[1]))),
            "logit_scale": float(np.max(np.abs(want[0]))),
            "greedy_20_identical": bool(torch.equal(ort_tokens, ref_tokens)),
            "continuation": tokenizer.decode(ort_tokens[0, ids.shape[1]:])}


# ---- driver ---------------------------------------------------------------------------------------------------
def run_stage(name: str, argv: list[str], work: Path) -> dict:
    """Run one stage in a fresh interpreter; returns its result with wall seconds and peak RSS."""
    out = work / f"stage-{name}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(work), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["wall_seconds_with_startup"] = time.perf_counter() - start
    return result


def _child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    start = time.perf_counter()
    result = globals()[f"stage_{args.stage}"](args, work)
    result.update(seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())
    (work / f"stage-{args.stage}.json").write_text(json.dumps(result, indent=2))


def _table(label: str, stages: dict) -> str:
    rows = [f"{label}", f"{'stage':<8} {'seconds':>9} {'peak RSS MB':>12}"]
    for name, r in stages.items():
        rows.append(f"{name:<8} {r['seconds']:>9.1f} {r['peak_rss_mb']:>12.0f}")
    parity = stages.get("parity")
    if parity:
        rows.append(f"parity: prefill {parity['prefill_rel_diff']:.1e}, decode {parity['decode_rel_diff']:.1e} of the "
                    f"logit scale; 20 greedy tokens identical: {parity['greedy_20_identical']}")
    rep = stages.get("rewrite", {}).get("report")
    if rep:
        rows.append(f"nodes {rep['nodes_before']} -> {rep['nodes_after']}, initializers {rep['initializers_before']} -> "
                    f"{rep['initializers_after']}, KV inputs {rep['kv_inputs_before']} -> {rep['kv_inputs_after']}, "
                    f"files {rep['file_bytes_before'] / 1e9:.2f} -> {rep['file_bytes_after'] / 1e9:.2f} GB, "
                    f"KV bytes/token {rep['kv_bytes_per_token_before']} -> {rep['kv_bytes_per_token_after']}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--work", default="/tmp/subfit-rewrite-scale", help="scratch folder (needs ~10 GB for 1B)")
    p.add_argument("--model", help="an HF folder to use instead of the random Llama")
    p.add_argument("--export", help="with --model: its existing Optimum export folder (skips the export stage)")
    p.add_argument("--external-input", action="store_true",
                   help="with --export: rewrite a copy stored with external data (the lazy-loading path)")
    p.add_argument("--calibrate", action="store_true", help="with --model: calibrate on --text instead of a synthetic plan")
    p.add_argument("--text", default=str(Path(__file__).parents[1] / "assets" / "text" / "c4_first_half.txt"))
    p.add_argument("--label", default=None)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--results", default=str(RESULTS), help="JSON file the entry is added to")
    args = p.parse_args()
    if args.stage:
        _child(args)
        return

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    argv = [a for a in sys.argv[1:] if a != "--keep"]
    label = args.label or (Path(args.model).name if args.model else "random-llama")
    stages = {}
    try:
        for name in STAGES:
            if (name == "build" and args.model) or (name == "parity" and not args.model):
                continue
            stages[name] = run_stage(name, argv, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    entry = {"label": label, "model": args.model or "random Llama", "shape": None if args.model else {
        "hidden": args.hidden, "layers": args.layers, "ffn": args.ffn, "heads": args.heads,
        "kv_heads": args.kv_heads, "vocab": args.vocab}, "stages": stages,
        "machine": {"cpus": _cpus()}, "date": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[label] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(label, stages))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
