"""SubFit where users deploy: int4 models against onnxruntime-genai's model-builder int4 of the same checkpoint.

Every model is timed in one process, alternating with the others (A B C .. then reversed), ``--repeats`` rounds;
ratios to the builder's int4 are the median over rounds of the ratio within each round:
- ``genai tok/s``: onnxruntime-genai 0.18 generate, ``--prompt`` token prompt, ``--new`` new tokens, greedy;
- ``tok/cpu-s``: the same runs per CPU second of this process (steadier than wall time on a shared machine);
- ``decode ms``: raw ONNX Runtime decode at context ``--context`` (one prefill, then ``--steps`` single-token
  steps fed back by name; median step);
and scored once for quality: held-out perplexity (second half of wiki.utf8, ``--windows`` x ``--window-len``
tokens, each window from an empty past, no BOS for SmolLM2) as a ratio to the dense fp32 model.

Variants (built into ``--work`` once, reused after):
- ``builder-int4``: ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` (pass its folder: it needs
  transformers 5.x) - the reference of every speed ratio;
- ``fused-int4``: our fused export of the checkpoint (``export --layout builder``) + ONNX Runtime's int4
  quantizer, dense;
- ``fused-sNN``: ``rewrite FUSED --plan PLAN --quantize int4`` (int4 body, int8 bypasses, lm_head and the
  first/last eighth's down projections int8), per plan; ``fused-sNN-allint4``: every weight matrix int4 but the
  bypasses (int8);
- ``builder-sNN``: ``rewrite BUILDER_INT4 --plan PLAN --quantize int4`` (the builder's int4 graph, bypasses
  int8); give plans calibrated on that graph (``optimize builder_dir``, onnx backend) or any plan.

    python benchmarks/deploy_int4.py --checkpoint assets/smollm2-135m-instruct \\
        --builder-int4 assets/builder/smollm2-135m-instruct-int4 --plan 25=PLAN_DIR [--plan 12.5=..] \\
        [--builder-plan 25=PLAN_DIR] [--threads 1]
Writes benchmarks/results/deploy_int4.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---- building (the product's own commands: export --layout builder, rewrite --quantize) ----------------------
def quantized_copy(src: Path, out: Path, spec) -> None:
    """A dense graph quantized as a whole (no plan: the product's --quantize runs with a rewrite), staged."""
    import onnx_ir as ir

    from subfit_onnx.exporters.quantize import quantize_graph
    from subfit_onnx.names import DATA_FILE, ONNX_FILE
    from subfit_onnx.passes.external_data import LoadExternalTensorsPass
    from subfit_onnx.staging import STAGED, staged_output

    with staged_output(out) as work:
        staged = work / STAGED
        staged.mkdir()
        model = ir.load(src / ONNX_FILE)
        LoadExternalTensorsPass(None)(model)
        quantized = quantize_graph(ir.serde.serialize_model(model), spec).model
        ir.save(ir.serde.deserialize_model(quantized), staged / ONNX_FILE, external_data=DATA_FILE,
                size_threshold_bytes=1024)
        for item in src.iterdir():
            if item.is_file() and not item.name.startswith("model.onnx"):
                shutil.copy2(item, staged / item.name)


def build(args: argparse.Namespace) -> dict[str, Path]:
    import subfit_onnx
    from subfit_onnx.exporters.quantize import QuantizeSpec

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {"builder-int4": Path(args.builder_int4)}
    fp32 = work / "fused-fp32"
    if not (fp32 / "model.onnx").is_file():
        subfit_onnx.export(args.checkpoint, fp32, layout="builder")
    dense = work / "fused-int4"
    if not (dense / "model.onnx").is_file():
        quantized_copy(fp32, dense, QuantizeSpec())
    models["fused-int4"] = dense
    for spec in args.plan:
        label, path = spec.split("=", 1)
        out = work / f"fused-s{label}"  # the recommended int4 mix: subfit-onnx rewrite FUSED --quantize int4
        if not (out / "model.onnx").is_file():
            subfit_onnx.rewrite(fp32, path, out, quantize="int4")
        models[out.name] = out
        allint4 = work / f"fused-s{label}-allint4"  # every body matrix and lm_head int4, bypasses int8
        if not (allint4 / "model.onnx").is_file():
            plain = work / f".fused-s{label}-fp32"
            subfit_onnx.rewrite(fp32, path, plain, overwrite=True)
            quantized_copy(plain, allint4, QuantizeSpec())
            shutil.rmtree(plain)
        models[allint4.name] = allint4
    for spec in args.builder_plan:
        label, path = spec.split("=", 1)
        out = work / f"builder-s{label}"  # the plan on the builder's int4 graph, bypasses int8
        if not (out / "model.onnx").is_file():
            subfit_onnx.rewrite(args.builder_int4, path, out, quantize="int4")
        models[out.name] = out
    models["fp32"] = fp32
    return models


# ---- measuring ---------------------------------------------------------------------------------------------
def genai_folder(folder: Path, threads: int, shadows: Path) -> Path:
    if not threads:
        return folder
    shadow = shadows / f"genai-t{threads}-{folder.name}"
    shadow.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name != "genai_config.json" and not (shadow / item.name).exists():
            (shadow / item.name).symlink_to(item.resolve())
    cfg = json.loads((folder / "genai_config.json").read_text())
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    (shadow / "genai_config.json").write_text(json.dumps(cfg))
    return shadow


class GenaiRunner:
    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.model = og.Model(str(folder))

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        from subfit_onnx.evaluation.runtimes import genai_greedy

        c0, t0 = time.process_time(), time.perf_counter()
        produced = genai_greedy(self.model, ids, new)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert produced == new
        return new / wall, new / cpu


class DecodeRunner:
    def __init__(self, folder: Path, threads: int) -> None:
        from subfit_onnx.evaluation.decoder import OnnxDecoder
        from subfit_onnx.runtime import ort_session_options

        self.decoder = OnnxDecoder(folder, session_options=ort_session_options(intra_op_threads=threads or None))

    def run(self, context: np.ndarray, steps: int) -> tuple[float, float]:
        step = self.decoder.forward(context)
        token = int(step.logits[0, -1].argmax())
        walls, c0 = [], time.process_time()
        for _ in range(steps):
            t0 = time.perf_counter()
            step = self.decoder.forward(np.asarray([[token]], dtype=np.int64), step.past)
            walls.append(time.perf_counter() - t0)
            token = int(step.logits[0, -1].argmax())
        return statistics.median(walls) * 1e3, (time.process_time() - c0) / steps * 1e3


def alternate(names: list[str], runners: dict, call, repeats: int) -> dict[str, list[tuple[float, float]]]:
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else list(reversed(names))):
            samples[name].append(call(runners[name]))
    return samples


def paired(samples: dict[str, list[tuple[float, float]]], name: str, ref: str, field: int) -> float:
    """Median over rounds of the ratio taken within each round: each round times every model back to back, so a
    drift of the shared machine between rounds cancels (medians of each model's own samples do not)."""
    return statistics.median(a[field] / b[field] for a, b in zip(samples[name], samples[ref]))


def perplexity(folder: Path, windows: np.ndarray) -> float:
    from subfit_onnx.evaluation.decoder import OnnxDecoder
    from subfit_onnx.evaluation.logprobs import token_logprobs
    from subfit_onnx.runtime import ort_session_options

    decoder = OnnxDecoder(folder, session_options=ort_session_options())
    nll, count = 0.0, 0
    for window in windows:
        logits = decoder.forward(window[None, :]).logits[0, :-1].astype(np.float32)
        lp = token_logprobs(logits, window[1:])
        nll -= float(lp.sum())
        count += lp.size
    return float(np.exp(nll / count))


def heldout_windows(checkpoint: Path, wiki: Path, count: int, length: int, work: Path) -> np.ndarray:
    """Windows over the second half of wiki.utf8 (cut at the first article after the middle)."""
    from transformers import AutoTokenizer

    from subfit_onnx.calibration.text import load_documents, token_windows, tokenize_documents

    text = wiki.read_text(encoding="utf-8")
    half = work / "wiki_second_half.txt"
    half.write_text(text[text.find("<doc", len(text) // 2):], encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return token_windows(tokenize_documents(tokenizer, load_documents(half)), count, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    assets = Path(os.environ.get("SUBFIT_ASSETS", ROOT / "assets"))
    parser.add_argument("--checkpoint", type=Path, default=assets / "smollm2-135m-instruct")
    parser.add_argument("--builder-int4", type=Path, default=assets / "builder" / "smollm2-135m-instruct-int4")
    parser.add_argument("--plan", action="append", default=[], help="LABEL=PLAN_DIR for the fused route")
    parser.add_argument("--builder-plan", action="append", default=[], help="LABEL=PLAN_DIR for the builder route")
    parser.add_argument("--work", default=str(ROOT / "work" / "deploy_int4"))
    parser.add_argument("--wiki", type=Path, default=assets / "text" / "wiki.utf8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="pin intra-op threads (0: runtime default)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "deploy_int4")
    args = parser.parse_args()

    from subfit_onnx.evaluation.latency import prompt_ids

    models = build(args)
    shadows = Path(args.work) / "shadows"
    timed = [n for n in models if n != "fp32"]
    load_before = os.getloadavg()
    ids, context = prompt_ids(49152, args.prompt, seed=3), prompt_ids(49152, args.context, seed=5)
    runners = {n: GenaiRunner(genai_folder(models[n], args.threads, shadows)) for n in timed}
    for r in runners.values():
        r.run(ids, 4)
    genai = alternate(timed, runners, lambda r: r.run(ids, args.new), args.repeats)
    del runners
    runners = {n: DecodeRunner(models[n], args.threads) for n in timed}
    for r in runners.values():
        r.run(context[:, :64], 2)
    decode = alternate(timed, runners, lambda r: r.run(context, args.steps), args.repeats)
    del runners
    load_after = os.getloadavg()
    ppl = {}
    if not args.skip_ppl:
        windows = heldout_windows(args.checkpoint, args.wiki, args.windows, args.window_len, Path(args.work))
        for name, folder in models.items():
            ppl[name] = perplexity(folder, windows)
    ref = "builder-int4"
    med = {n: {"genai_tok_s": statistics.median(s[0] for s in genai[n]),
               "genai_tok_per_cpu_s": statistics.median(s[1] for s in genai[n]),
               "decode_ms": statistics.median(s[0] for s in decode[n]),
               "decode_cpu_ms": statistics.median(s[1] for s in decode[n])} for n in timed}
    rows = []
    for name in models:
        row = {"model": name, "path": str(models[name]),
               "bytes": sum(p.stat().st_size for p in models[name].glob("model.onnx*"))}
        if name in med:
            m = med[name]
            row.update(m, genai_ratio=paired(genai, name, ref, 0), genai_cpu_ratio=paired(genai, name, ref, 1),
                       decode_ratio=paired(decode, name, ref, 0), decode_cpu_ratio=paired(decode, name, ref, 1))
        if ppl:
            row.update(ppl=ppl[name], ppl_ratio=ppl[name] / ppl["fp32"])
        rows.append(row)
    header = (f"| model | genai tok/s | x builder int4 | tok/cpu-s ratio | decode ms @{args.context} | time ratio "
              "| ppl | ppl / fp32 |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["model"]]
        cells += [f"{r['genai_tok_s']:.1f}", f"{r['genai_ratio']:.3f}", f"{r['genai_cpu_ratio']:.3f}",
                  f"{r['decode_ms']:.2f}", f"{r['decode_ratio']:.3f}"] if "genai_tok_s" in r else ["-"] * 5
        cells += [f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.3f}"] if "ppl" in r else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "load_avg_before": load_before, "load_avg_after": load_after, "rows": rows,
              "samples": {"genai": genai, "decode": decode}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(table + "\n")
    print(f"load average {load_before} -> {load_after}", file=sys.stderr)


if __name__ == "__main__":
    main()
