"""FFN bypasses that keep a few of the removed FFN's own neurons: the product's ``--ffn-bypass`` modes (``--product``)
beside this script's own refit of the plan with linear FFN bypasses, which explores shapes the product does not
offer.

A linear bypass cannot follow a gated FFN's nonlinearity: on SmolLM2 at 25% the pass-2 fits of the removed FFNs
leave 27-49% of their output energy unexplained on the calibration tokens. Here, after SubFit with linear FFN
bypasses, each removed gated FFN (``act(x Wg) * (x Wu) @ Wd``, then its post-norm where the family has one) becomes

    y = (x P) Wx + a_K(x) Wk + b,    a_K(x) = act(x Wg[:, K]) * (x Wu[:, K])

with ``K`` k of its neurons, ``P`` the top-r principal directions of its input ``x`` (the identity for
``full``), and ``Wx``, ``Wk``, ``b`` one ridge least-squares fit to the FFN's output on the calibration tokens:
the product's ``fit_bypass`` (closed form, ridge 1e-2 relative to the mean diagonal), on those features. The FFNs
are refitted in depth order on the compressed upstream; the selection and the attention bypasses stay as SubFit
chose them.

A shape is ``r:k[:choice]``: ``r`` = ``full`` (a d x d map, the product's FFN bypass) or a rank, ``k`` neurons,
chosen by ``energy`` (``E[a_j^2] |Wd_j|^2``, the default) or ``residual`` (the part of ``a_j`` that ``x P`` does
not predict linearly, times ``|Wd_j|^2``). It costs ``d^2`` or ``2 d r`` parameters, plus ``3 d k``: rank d/8 with
d/4 neurons (``72:144`` on SmolLM2, ``80:160`` on Gemma-3-270m) costs what the product's d x d bypass costs.
Shapes joined by ``|`` (``full:0|72:144``) give each FFN the one whose fit leaves the least error on the
calibration tokens. ``--default-sparsity S`` adds SubFit's own plan with linear FFN bypasses at sparsity S, for a
comparison at equal net parameters with shapes that cost more than the d x d bypass.

Perplexity: 16 x 512-token windows of held-out Wikipedia (second half of wiki.utf8, token-wise), BOS-led where the
tokenizer adds BOS, PyTorch; ratio to dense. Calibration: 64 x 256 tokens of C4's first half. Writes
``benchmarks/results/neuron_bypass_<model>.json``, one entry per sparsity; a run on the same plan keeps the rows
it did not measure again.

``--product MODE ...`` calibrates with the product's ``ffn_bypass=MODE`` at ``--sparsity`` (rows ``product
--ffn-bypass MODE``, with their calibration seconds; time them apart on a quiet machine to compare).

    python benchmarks/neuron_bypass.py [--model smollm2|gemma3] [--shapes full:0 72:144 'full:0|72:144' ...]
                                       [--product linear neurons auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.fitting import fit_bypass
from subfit_onnx.calibration.stats import UnitStats
from subfit_onnx.calibration.text import (
    calibration_tokens,
    leading_bos,
    load_documents,
    token_windows,
    tokenize_documents,
)
from subfit_onnx.config import SubFitConfig
from subfit_onnx.torch_eval import torch_perplexity
from subfit_onnx.torch_model import decoder_layers, model_family, unit_module, unit_param_table

REPO = Path(__file__).resolve().parents[1]
RIDGE = 0.01
BATCH = 8


class _Reached(Exception):
    """Stops a forward pass once the removed FFN's input has been read."""


class NeuronBypass(nn.Module):
    """A removed FFN's stand-in: a linear map plus k of its neurons."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, act: nn.Module, linear: torch.Tensor,
                 neurons_out: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.gate, self.up, self.act = gate, up, act
        self.linear, self.neurons_out, self.bias = linear, neurons_out, bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x @ self.linear + (self.act(x @ self.gate) * (x @ self.up)) @ self.neurons_out + self.bias


def parse_shape(text: str) -> tuple[int | None, int, str]:
    """``r:k[:choice]`` as (rank or None for full, neurons, neuron choice)."""
    parts = text.split(":")
    choice = parts[2] if len(parts) == 3 else "energy"
    if len(parts) not in (2, 3) or choice not in ("energy", "residual") or not parts[1].isdigit() \
            or not (parts[0] == "full" or parts[0].isdigit()):
        raise SystemExit(f"error: shape {text!r} is not r:k[:energy|residual], r = full or a rank")
    return (None if parts[0] == "full" else int(parts[0])), int(parts[1]), choice


def shape_params(hidden: int, rank: int | None, k: int) -> int:
    return (hidden * hidden if rank is None else 2 * hidden * rank) + 3 * hidden * k


def unit_inputs(model: nn.Module, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """What ``module`` receives over the calibration tokens, as one float64 [tokens, d] matrix."""
    seen: list[torch.Tensor] = []

    def take(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().reshape(-1, x.shape[-1]).double())
        raise _Reached

    hook = module.register_forward_pre_hook(take, with_kwargs=True)
    try:
        for start in range(0, len(tokens), BATCH):
            try:
                model(tokens[start:start + BATCH], use_cache=False)
            except _Reached:
                pass
    finally:
        hook.remove()
    return torch.cat(seen)


def neuron_fit(x: torch.Tensor, dense_mlp: nn.Module, post_norm: nn.Module | None, rank: int | None, k: int,
               choice: str) -> tuple[NeuronBypass, float]:
    """The fitted stand-in and its relative error on ``x`` (fraction of the output's centred energy left)."""
    gate, up = dense_mlp.gate_proj.weight.double().T, dense_mlp.up_proj.weight.double().T
    down = dense_mlp.down_proj.weight.double().T
    acts = dense_mlp.act_fn(x @ gate) * (x @ up)
    y = acts @ down
    if post_norm is not None:
        y = copy.deepcopy(post_norm).double()(y)
    xc, ac = x - x.mean(0), acts - acts.mean(0)
    if rank is None:
        basis = torch.eye(x.shape[1], dtype=torch.float64)
    else:
        eigvals, eigvecs = torch.linalg.eigh(xc.T @ xc)
        basis = eigvecs[:, torch.argsort(eigvals, descending=True)[:rank]]
    weight_out = (down ** 2).sum(1)
    if choice == "energy":
        importance = (acts ** 2).sum(0) * weight_out
    else:
        xp = xc @ basis
        gram = xp.T @ xp
        cross = xp.T @ ac
        explained = (cross * torch.linalg.solve(gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(gram),
                     dtype=torch.float64), cross)).sum(0) if rank != 0 else 0.0
        importance = ((ac ** 2).sum(0) - explained) * weight_out
    kept = torch.argsort(importance, descending=True)[:k]
    feats = torch.cat([x @ basis, acts[:, kept]], 1).numpy()
    target = y.numpy()
    # the product's own closed-form fit (uniform tokens, float64), with the features as the bypass input; the
    # stream (zeros here) only feeds SubFit's scores, not the fit
    stats = UnitStats(feats.shape[1], target.shape[1], "uniform", np.float64)
    stats.update(feats[None], target[None], np.zeros_like(target)[None])
    fitted, _ = fit_bypass(stats, rank=None, ridge=RIDGE)
    centred = target - target.mean(0)
    err = float(((fitted.apply(feats) - target) ** 2).sum() / (centred ** 2).sum())
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32).contiguous()
    r = basis.shape[1]
    return NeuronBypass(f32(gate[:, kept]), f32(up[:, kept]), dense_mlp.act_fn, f32(basis @ fitted.weight[:r]),
                        f32(fitted.weight[r:]), f32(fitted.bias)), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--assets", default=str(REPO / "assets"))
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--shapes", nargs="+", help="default: full:0, d/8:d/4, full:0|d/8:d/4 and full:128")
    ap.add_argument("--default-sparsity", type=float, nargs="*", default=[])
    ap.add_argument("--product", nargs="*", default=[], choices=("linear", "neurons", "auto"),
                    help="also calibrate with the product's --ffn-bypass MODE (timed side by side)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    for name in args.shapes or []:  # refused before any work
        [parse_shape(part) for part in name.split("|")]
    torch.set_grad_enabled(False)
    assets = fetch_assets(args.assets, gemma=args.model == "gemma3")
    model_dir = assets.gemma3 if args.model == "gemma3" else assets.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = copy.deepcopy(dense)
    family = model_family(dense)
    wiki = tokenize_documents(tokenizer, load_documents(assets.wiki))
    windows = token_windows(wiki[wiki.size // 2:], 16, 512, leading_bos(tokenizer))
    dense_ppl = torch_perplexity(dense, windows, batch_size=2)
    ratio = lambda m: round(torch_perplexity(m, windows, batch_size=2) / dense_ppl, 4)
    cal = calibration_tokens(tokenizer, assets.c4_calibration, 64, 256)
    tokens = torch.as_tensor(cal)
    params = unit_param_table(dense)
    block = sum(params.values())
    hidden = dense.config.hidden_size
    same_cost = f"{hidden // 8}:{hidden // 4}"
    names = args.shapes or ["full:0", same_cost, f"full:0|{same_cost}", "full:128"]
    shapes = [(name, [parse_shape(part) for part in name.split("|")]) for name in names]

    rows: list[dict[str, Any]] = []
    for sparsity in args.default_sparsity:
        other = copy.deepcopy(dense)
        plan = calibrate_model(other, cal, SubFitConfig(sparsity=sparsity, ffn_bypass="linear"),
                               keep_compressed=True).plan
        rows.append({"shape": f"SubFit, linear FFN bypasses, at {sparsity}", "removed": plan.depth_map(),
                     "net_sparsity": round(plan.sparsity.net, 4), "wiki": ratio(other)})
        print(rows[-1], flush=True)
        del other

    for mode in args.product:
        other = copy.deepcopy(dense)
        t0 = time.perf_counter()
        made = calibrate_model(other, cal, SubFitConfig(sparsity=args.sparsity, ffn_bypass=mode), keep_compressed=True)
        seconds = time.perf_counter() - t0
        forms = {u.layer: u.bypass.form for u in made.plan.removed_units("mlp")}
        rows.append({"shape": f"product --ffn-bypass {mode}", "removed": made.plan.depth_map(),
                     "chosen": [forms[i] for i in sorted(forms)], "net_sparsity": round(made.plan.sparsity.net, 4),
                     "calibrate_seconds": round(seconds, 1), "wiki": ratio(other)})
        print(rows[-1], flush=True)
        del other

    # the shapes refit the FFNs of the plan with d x d bypasses (the default before 2026-12-07: ``auto``'s plan
    # removes the same units)
    plan = calibrate_model(model, cal, SubFitConfig(sparsity=args.sparsity, ffn_bypass="linear"),
                           keep_compressed=True).plan
    layers, dense_layers = decoder_layers(model, family), decoder_layers(dense, family)
    ffns = sorted(u.layer for u in plan.removed if u.kind == "mlp")
    fitted = {i: unit_module(layers[i], family, "mlp") for i in ffns}
    post_name = family.mlp.post_norm
    for name, options in shapes:
        t0 = time.perf_counter()
        for i in ffns:
            setattr(layers[i], family.mlp.module, fitted[i])
        errors, chosen, extra = [], [], 0
        for i in ffns:  # depth order: each fit sees the upstream as already replaced
            x = unit_inputs(model, unit_module(layers[i], family, "mlp"), tokens)
            post = getattr(dense_layers[i], post_name) if post_name else None
            fits = [neuron_fit(x, unit_module(dense_layers[i], family, "mlp"), post, *option) for option in options]
            best = min(range(len(fits)), key=lambda j: fits[j][1])
            setattr(layers[i], family.mlp.module, fits[best][0])
            errors.append(round(fits[best][1], 4))
            chosen.append(best)
            extra += shape_params(hidden, *options[best][:2]) - hidden * hidden
        parts = name.split("|")
        rows.append({"shape": name, "chosen": [parts[j] for j in chosen],
                     "params_per_ffn": [shape_params(hidden, *options[j][:2]) for j in chosen],
                     "net_sparsity": round(plan.sparsity.net - extra / block, 4), "fit_errors": errors,
                     "seconds": round(time.perf_counter() - t0, 1), "wiki": ratio(model)})
        print(rows[-1], flush=True)
    out = Path(args.out) / f"neuron_bypass_{args.model}.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    earlier = saved.get(str(args.sparsity), {})
    if earlier.get("removed") == plan.depth_map():  # same plan: rows not measured again are kept
        measured = {row["shape"] for row in rows}
        rows = [row for row in earlier["rows"] if row["shape"] not in measured] + rows
    saved[str(args.sparsity)] = {
        "removed": plan.depth_map(), "removed_ffns": ffns, "dense_ppl": dense_ppl, "ridge": RIDGE,
        "calibration": "64 x 256 tokens of C4's first half",
        "windows": "16 x 512, wiki second half (token-wise), BOS rule, PyTorch", "rows": rows}
    out.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
