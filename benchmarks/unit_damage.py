"""Where a plan's perplexity goes: each removed unit alone, and the plan without it.

Selection decides on local scores (a bypass's error against the stream it lands in). This measures what each
removal does to the output on its own, so one can see whether the loss is spread over the units or owned by a few,
and how far the removals compound:

- ``only U``: the dense model with U alone replaced by the plan's bypass;
- ``without U``: the plan with U kept (every other bypass as fitted);
- ``product of only``: what the plan would cost if removals did not interact.

Held-out wiki (second half of wiki.utf8), 16 windows of 512 tokens, BOS rule, PyTorch; perplexity ratios to dense.
The plan is ``subfit-onnx calibrate MODEL --sparsity S -c assets/text/c4_first_half.txt`` at the defaults unless
``--plan`` names one. Writes benchmarks/results/unit_damage_<model>.json.

``--every-unit`` measures instead every unit of the model alone, each with its pass-1 bypass (fitted on the dense
upstream, the fit a unit alone gets), and the best selection those figures allow at the sparsity: the units whose
alone-ratios multiply to the least while removing at least the plan's parameters (an exact knapsack). That is a
floor for any selection of bypassed units as long as removals do not help one another: it says how low a better
selection alone could bring the plan. It then runs pass 2 ranked by those alone-ratios in place of the end-to-end
probe's distances (an oracle for the score) and measures that plan. ``--alone JSON`` reuses an earlier run's
alone-ratios. Writes benchmarks/results/unit_damage_<model>_every_unit.json.

    python benchmarks/unit_damage.py [--model smollm2|gemma3] [--sparsity 0.25] [--plan PLAN] [--every-unit]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.calibrate import DensePass, calibrate_model
from subfit_onnx.calibration.selection import target_params
from subfit_onnx.calibration.text import (
    calibration_tokens,
    leading_bos,
    load_documents,
    token_windows,
    tokenize_documents,
)
from subfit_onnx.config import SubFitConfig
from subfit_onnx.names import unit_key
from subfit_onnx.plan import Plan, RemovedUnit, bypass_spec, bypass_tensors, load_plan
from subfit_onnx.reference import apply_plan
from subfit_onnx.torch_eval import torch_perplexity
from subfit_onnx.torch_model import unit_param_table


def short_name(layer: int, kind: str) -> str:
    """A unit as the tables and JSON name it (``15m``, ``7a``)."""
    return f"{layer}{kind[0]}"


def pass1_units(dense: DensePass, params: dict[tuple[int, str], int]) -> tuple[list[RemovedUnit], dict]:
    """Every unit as a plan entry with the bypass pass 1 fitted for it on the dense upstream."""
    units, tensors = [], {}
    for (layer, kind), a in sorted(dense.assessments.items()):
        key = unit_key(layer, kind)
        tensors.update(bypass_tensors(key, a.bypass))
        units.append(RemovedUnit(layer=layer, kind=kind, score=0.0, fit_error=a.fit_relative,
                                 stream_error=a.stream_relative, params_removed=params[(layer, kind)],
                                 bypass=bypass_spec(key, a.bypass)))
    return units, tensors


def best_selection(alone: dict[str, float], params: dict[str, int], target: int) -> tuple[float, list[str]]:
    """The units whose alone-ratios multiply to the least with at least ``target`` parameters removed.

    Exact: a knapsack over the distinct parameter sums, capped at the target. Every supported family has one
    attention and one FFN size, so the sums stay few.
    """
    best: dict[int, tuple[float, tuple[str, ...]]] = {0: (0.0, ())}
    for name, r in alone.items():
        cost = math.log(r)
        for total, (c, chosen) in list(best.items()):
            if total >= target:
                continue
            new = min(target, total + params[name])
            if new not in best or c + cost < best[new][0]:
                best[new] = (c + cost, (*chosen, name))
    cost, chosen = best[target]
    return math.exp(cost), sorted(chosen, key=lambda n: (int(n[:-1]), n[-1]))


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (no ties among measured floats)."""
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def every_unit(args: argparse.Namespace, dense_model: torch.nn.Module, dense: DensePass, cal: np.ndarray,
               ratio: Callable[..., float], plan: Plan) -> None:
    """Every unit alone, the best selection those figures allow, and pass 2 ranked by them (an oracle score)."""
    params = unit_param_table(dense_model)
    units, tensors = pass1_units(dense, params)
    alone = json.loads(Path(args.alone).read_text())["alone"] if args.alone else {}
    for unit in units:
        name = short_name(unit.layer, unit.kind)
        if name not in alone:
            alone[name] = ratio([unit], tensors)
            print(f"{name:5s} alone x{alone[name]:.4f}", flush=True)
    by_name = {short_name(u.layer, u.kind): u.params_removed for u in units}
    target = target_params(sum(params.values()), args.sparsity)
    floor, chosen = best_selection(alone, by_name, target)
    print(f"best selection by alone-ratios: x{floor:.4f} {' '.join(chosen)}")
    keys = sorted(dense.end_to_end)
    rho = rank_correlation([dense.end_to_end[k] for k in keys], [alone[short_name(*k)] for k in keys])
    oracle = copy.copy(dense)  # pass 2 as usual, but ranked by the measured alone log-ratios
    oracle.end_to_end = {k: math.log(alone[short_name(*k)]) for k in keys}
    ranked = calibrate_model(copy.deepcopy(dense_model), cal, SubFitConfig(sparsity=args.sparsity), dense=oracle)
    ranked_ratio = ratio(ranked.plan.removed, ranked.tensors)
    print(f"probe vs alone rank correlation {rho:.3f}; pass 2 ranked by alone-ratios: "
          f"{ranked.plan.depth_map()} x{ranked_ratio:.4f} (default plan {plan.depth_map()})")
    out = Path(args.out or f"benchmarks/results/unit_damage_{args.model}_every_unit.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plan": plan.depth_map(), "sparsity": args.sparsity, "alone": alone,
                               "params": by_name, "target_params": target, "best_product": floor,
                               "best_units": chosen, "probe_rank_correlation": rho,
                               "alone_ranked_plan": ranked.plan.depth_map(), "alone_ranked_ratio": ranked_ratio,
                               "weighting": dense.weighting,
                               "windows": f"{args.eval_windows} x 512, wiki second half"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="assets")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--plan", default=None, help="a saved plan folder (default: calibrate at the defaults)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--every-unit", action="store_true", help="every unit alone, and the best selection by it")
    ap.add_argument("--alone", default=None, help="with --every-unit: reuse the alone-ratios of an earlier JSON")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/unit_damage_<model>[_every_unit].json")
    args = ap.parse_args()
    if args.plan and args.every_unit:
        raise SystemExit("--every-unit needs pass 1's bypasses: calibrate here, without --plan")

    assets = fetch_assets(args.assets, gemma=args.model == "gemma3")
    model_dir = assets.model if args.model == "smollm2" else assets.gemma3
    tok = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if args.plan:
        plan, tensors = load_plan(args.plan)
    else:
        cal = calibration_tokens(tok, assets.c4_calibration, 64, 256)
        result = calibrate_model(copy.deepcopy(dense), cal, SubFitConfig(sparsity=args.sparsity))
        plan, tensors, dense_pass = result.plan, result.tensors, result.dense
    wiki = tokenize_documents(tok, load_documents(assets.wiki))
    windows = token_windows(wiki[wiki.size // 2:], args.eval_windows, 512, leading_bos(tok))
    dense_ppl = torch_perplexity(dense, windows)

    def ratio(units: list, bypasses: dict = tensors) -> float:
        model = apply_plan(copy.deepcopy(dense), plan.model_copy(update={"removed": units}), bypasses)
        return torch_perplexity(model, windows) / dense_ppl

    if args.every_unit:
        every_unit(args, dense, dense_pass, cal, ratio, plan)
        return
    plan_ratio = ratio(plan.removed)
    print(f"plan {plan.depth_map()}: x{plan_ratio:.4f}", flush=True)
    units = {}
    for unit in plan.removed:
        name = short_name(unit.layer, unit.kind)
        units[name] = {"only": ratio([unit]), "without": ratio([u for u in plan.removed if u is not unit]),
                       "params_removed": unit.params_removed, "stream_error": unit.stream_error}
        print(f"{name:5s} only x{units[name]['only']:.4f}  without x{units[name]['without']:.4f}", flush=True)
    product = math.prod(u["only"] for u in units.values())
    print(f"product of only: x{product:.4f}")
    out = Path(args.out or f"benchmarks/results/unit_damage_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "depth_map": plan.depth_map(), "dense_ppl": dense_ppl,
                               "windows": f"{args.eval_windows} x 512, wiki second half", "plan_ratio": plan_ratio,
                               "product_of_only": product, "units": units}, indent=2))


if __name__ == "__main__":
    main()
