"""An experiment, not a setting: closed-form compensation in the units SubFit keeps (issue 14's idea).

SubFit's bypasses are each fitted to their own unit's output, so the errors of 14 bypasses add up downstream
(SmolLM2 at 25%: each removed unit alone costs 1.02-1.10x perplexity, together 1.94x). Here, after SubFit at
the defaults, the output projection of kept units (``o_proj`` / ``down_proj``) is refitted in depth order, on
the compressed upstream, so that the residual stream after the unit comes closer to the dense model's:

    W = argmin ||A W - T||^2 + lam ||W - W0||^2,   lam = ridge * mean(diag(A^T A))

with ``A`` the projection's input on the compressed model, ``T`` the dense stream after the unit minus the
compressed stream before it, and ``W0`` the trained weights (ridge toward them, not toward zero: a small ridge
chases the dense stream and overfits the calibration text). ``--mode next`` refits the first kept unit after
each run of removed ones, ``--mode all`` every kept unit from the first removal on.

It runs on SmolLM2 only. Families that normalise a unit's output before the residual add (Gemma's post-norms)
need more: a first try that mapped ``T`` back through that norm at the current output's per-token RMS gave NaN
perplexity on Gemma-3-270m, for reasons not yet measured.

    python benchmarks/kept_unit_compensation.py [--mode next|all] [--ridge 1 ...]

Perplexity: 16 x 512-token windows of held-out Wikipedia (second half of wiki.utf8) and of C4's second half,
BOS-led where the tokenizer adds BOS, PyTorch; ratio to dense. Writes
``benchmarks/results/kept_unit_compensation_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.architectures import UNIT_KINDS, UnitKind
from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.text import (
    calibration_tokens,
    leading_bos,
    load_documents,
    token_windows,
    tokenize_documents,
)
from subfit_onnx.config import SubFitConfig
from subfit_onnx.torch_eval import torch_perplexity
from subfit_onnx.torch_model import decoder_layers, model_family, unit_module

REPO = Path(__file__).resolve().parents[1]
PROJECTION = {"attention": "o_proj", "mlp": "down_proj"}  # Llama, Qwen, Mistral and Gemma name them alike
BATCH = 8
Unit = tuple[int, UnitKind]


class _Reached(Exception):
    """Stops a forward pass once the unit of interest has run: nothing after it is needed."""


class UnitTaps:
    """Per batch: the stream before one unit, its contribution to the stream and its projection's input, read by
    hooks from one (partial) forward pass."""

    def __init__(self, model: nn.Module, unit: Unit, projection: bool) -> None:
        family = model_family(model)
        layer_idx, kind = unit
        layer = decoder_layers(model, family)[layer_idx]
        self.family, self.layer, self.kind = family, layer, kind
        self.seen: dict[str, torch.Tensor] = {}
        self.hooks = [layer.register_forward_pre_hook(self._take_input, with_kwargs=True)]
        self.hooks += [unit_module(layer, family, k).register_forward_hook(self._take(k)) for k in UNIT_KINDS]
        if projection:
            proj = getattr(unit_module(layer, family, kind), PROJECTION[kind])
            self.hooks.append(proj.register_forward_hook(self._take_projection))

    def _take_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def _take(self, kind: UnitKind):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            self.seen[kind] = (out[0] if isinstance(out, tuple) else out).detach()
            if kind == self.kind:
                raise _Reached
        return hook

    def _take_projection(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.seen["proj_in"] = args[0].detach()

    def run(self, model: nn.Module, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen = {}
        try:
            model(rows, use_cache=False)
        except _Reached:
            pass
        before = self.seen["input"] + (self.seen["attention"] if self.kind == "mlp" else 0)
        return {**self.seen, "before": before, "after": before + self.seen[self.kind]}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).double()


def dense_after(dense: nn.Module, unit: Unit, tokens: torch.Tensor) -> list[torch.Tensor]:
    taps = UnitTaps(dense, unit, projection=False)
    try:
        return [taps.run(dense, tokens[s:s + BATCH])["after"] for s in range(0, len(tokens), BATCH)]
    finally:
        taps.close()


def refit_projection(model: nn.Module, unit: Unit, tokens: torch.Tensor, targets: list[torch.Tensor],
                     ridge: float) -> float:
    """Refit one kept unit's output projection toward the dense stream; returns the relative weight change."""
    taps = UnitTaps(model, unit, projection=True)
    proj = getattr(unit_module(taps.layer, taps.family, unit[1]), PROJECTION[unit[1]])
    gram = cross = None
    try:
        for batch, target in zip(range(0, len(tokens), BATCH), targets):
            seen = taps.run(model, tokens[batch:batch + BATCH])
            a, t = _flat(seen["proj_in"]), _flat(target - seen["before"])
            gram = a.T @ a if gram is None else gram + a.T @ a
            cross = a.T @ t if cross is None else cross + a.T @ t
    finally:
        taps.close()
    w0 = proj.weight.detach().double().T  # [in, out]
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), cross + lam * w0)
    proj.weight.copy_(w.T.to(proj.weight.dtype))
    return float((w - w0).norm() / w0.norm())


def compensated_units(removed: set[Unit], num_layers: int, mode: str) -> list[Unit]:
    order = [(i, k) for i in range(num_layers) for k in UNIT_KINDS]
    first = min(order.index(u) for u in removed)
    kept = [(pos, u) for pos, u in enumerate(order) if pos > first and u not in removed]
    return [u for pos, u in kept if mode == "all" or order[pos - 1] in removed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=str(REPO / "assets"))
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--mode", choices=("next", "all"), default="all")
    ap.add_argument("--ridge", type=float, nargs="+", default=[1.0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    assets = fetch_assets(args.assets)
    model_dir = assets.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense, model = load(), load()
    bos = leading_bos(tokenizer)
    wiki = tokenize_documents(tokenizer, load_documents(assets.wiki))
    texts = {"wiki": token_windows(wiki[wiki.size // 2:], 16, 512, bos),
             "c4": token_windows(tokenize_documents(tokenizer, load_documents(assets.c4_heldout)), 16, 512, bos)}
    dense_ppl = {name: torch_perplexity(dense, w, batch_size=2) for name, w in texts.items()}
    ratios = lambda: {name: round(torch_perplexity(model, w, batch_size=2) / dense_ppl[name], 4)
                      for name, w in texts.items()}
    cal = calibration_tokens(tokenizer, assets.c4_calibration, 64, 256)
    result = calibrate_model(model, cal, SubFitConfig(sparsity=args.sparsity), keep_compressed=True)
    removed = {(u.layer, u.kind) for u in result.plan.removed}
    units = compensated_units(removed, len(decoder_layers(model, model_family(model))), args.mode)
    rows: list[dict[str, Any]] = [{"ridge": None, "units": 0, **ratios()}]
    print(f"{result.plan.depth_map()} without compensation: {rows[0]}", flush=True)
    tokens = torch.as_tensor(cal)
    targets = {u: dense_after(dense, u, tokens) for u in units}
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    for ridge in args.ridge:
        model.load_state_dict(trained, strict=False)
        t0 = time.perf_counter()
        changes = [refit_projection(model, u, tokens, targets[u], ridge) for u in units]
        row = {"ridge": ridge, "units": len(units), "seconds": round(time.perf_counter() - t0, 1),
               "max_weight_change": round(max(changes), 4), **ratios()}
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out) / "kept_unit_compensation_smollm2.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[f"{args.mode}@{args.sparsity}"] = {
        "removed": result.plan.depth_map(), "compensated": [f"{i}{k[0]}" for i, k in units], "rows": rows,
        "dense_ppl": dense_ppl, "calibration": "64 x 256 tokens of C4's first half",
        "windows": "16 x 512, wiki second half and C4 second half, BOS rule, PyTorch"}
    out.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
