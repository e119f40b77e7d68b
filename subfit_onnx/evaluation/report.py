"""Plain-text tables for evaluation and benchmark results (returned as strings; the CLI prints them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned numbers, columns sized to fit."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def evaluation_table(result: dict[str, Any]) -> str:
    """Rows: perplexity, then acc / acc_norm per task; columns model, reference, ratio (when present)."""
    has_ref = result.get("reference") is not None
    headers = ["metric", "model"] + (["reference", "ratio"] if has_ref else [])
    rows: list[list[Any]] = []
    cand, ref = result["model"], result.get("reference") or {}

    def add(name: str, a: float | None, b: float | None) -> None:
        rows.append([name, a] + ([b, ratio(a, b)] if has_ref else []))

    if cand.get("perplexity"):
        add("perplexity", cand["perplexity"]["perplexity"], (ref.get("perplexity") or {}).get("perplexity"))
    for task, mc in cand.get("tasks", {}).items():
        ref_mc = (ref.get("tasks") or {}).get(task, {})
        add(f"{task} acc (n={mc['n']})", mc["acc"], ref_mc.get("acc"))
        add(f"{task} acc_norm", mc["acc_norm"], ref_mc.get("acc_norm"))
    lines = [f"model:     {cand['path']}"] + ([f"reference: {result['reference']['path']}"] if has_ref else [])
    ppl = cand.get("perplexity")
    if ppl:
        lines.append(f"perplexity on {ppl['source']}: {ppl['num_windows']} windows x {ppl['window_len']} tokens, "
                     f"evenly spread (stride {ppl['stride']} tokens), each "
                     f"{'BOS-led, scored after BOS' if ppl.get('bos') else 'scored from its first token'} "
                     f"({ppl['scored_tokens']} predictions)")
    return "\n".join(lines + ["", table(headers, rows)])


BENCH_ROWS = (
    ("prefill_128_ms", "prefill 128 tokens (ms)"),
    ("prefill_512_ms", "prefill 512 tokens (ms)"),
    ("decode_512_ms_per_token", "decode @512 (ms/token)"),
    ("generate_tokens_per_s", "generate (tokens/s)"),
    ("kv_bytes_per_token", "KV cache (KB/token)"),
    ("kv_bytes_at_context", "KV cache @2048 (MB)"),
    ("file_bytes", "model files (MB)"),
)
# decimal units (1 KB = 1,000 bytes, 1 MB = 10^6), as everywhere else in SubFit
_SCALE = {"kv_bytes_per_token": 1e-3, "kv_bytes_at_context": 1e-6, "file_bytes": 1e-6}


def benchmark_table(report: dict[str, Any]) -> str:
    cand, ref, ratios = report["candidate"], report.get("reference"), report.get("ratios") or {}
    headers = ["metric", "model"] + (["reference", "ratio"] if ref else [])
    rows = []
    for key, label in BENCH_ROWS:
        if key == "kv_bytes_at_context":
            label = f"KV cache @{report['settings']['kv_context']} (MB)"
        scale = _SCALE.get(key, 1.0)
        a = cand["metrics"].get(key)
        row = [label, None if a is None else a * scale]
        if ref:
            b = ref["metrics"].get(key)
            row += [None if b is None else b * scale, ratios.get(key)]
        rows.append(row)
    s = report["settings"]
    lines = [f"model:     {cand['path']}  (KV layers: {_layers(cand['kv_layers'])})"]
    if ref:
        lines.append(f"reference: {ref['path']}  (KV layers: {_layers(ref['kv_layers'])})")
    lines.append(f"provider {s['provider']}, medians of {s['repeats']} interleaved repeats; decode: "
                 f"{s['decode_steps']} steps; generate: {s['generate_tokens']} new tokens after "
                 f"{s['generate_prompt']} (load_for_generation)")
    return "\n".join(lines + ["", table(headers, rows)])


def runtimes_table(report: dict[str, Any]) -> str:
    models = report["models"]
    headers = ["runtime"] + [f"{m} (tok/s)" for m in models] + (["ratio"] if len(models) == 2 else [])
    rows = []
    for r in report["results"]:
        row = [r["runtime"]] + [r["tokens_per_s"].get(m) for m in models]
        if len(models) == 2:
            row.append(r["ratio"])
        rows.append(row)
    errors = [f"{r['runtime']}: {r['error']}" for r in report["results"] if r["error"]]
    head = (f"tokens/s, {report['new_tokens']} greedy tokens after {report['prompt_tokens']}, medians of "
            f"{report['repeats']} interleaved repeats (ratio = first / second model); optimum-default with "
            f"{report['torch_default_threads']} torch threads, optimum-tuned with 1")
    return "\n".join([head, "", table(headers, rows)] + (["", "errors:"] + errors if errors else []))


def _layers(layers: list[int]) -> str:
    """Compact layer list: 0-19,28,29."""
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if x is not None:
            start = prev = x
    return ",".join(out)
