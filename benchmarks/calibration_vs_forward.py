"""What each ``--ffn-bypass`` setting adds to calibration, in forward passes, timed interleaved in one process.

Whole ``optimize`` runs (``optimize_vs_forward.py``) move by a fifth between back-to-back runs on a shared machine:
on 2026-12-07 the same ``--ffn-bypass linear`` run measured 3.05x and 4.31x one forward, its forward 29.5 s and
24.0 s. Here one process loads the model once and alternates: a forward, then each setting's calibration followed by
a forward, for several rounds. Each calibration is divided by the mean of the forwards on both sides of it, so a
machine that slows down or speeds up between runs moves numerator and denominator together. The settings compared
share every other phase of ``optimize`` (export, checks, rewrite, quality), so their difference here is their
difference in ``optimize``. Rounds alternate which setting runs first.

Even so, a calibration's own phases drift by 10-20% between back-to-back runs on this machine, more than the
neurons cost. So each run also times the work only neurons do, directly: the fits with neurons pass 2 makes, the
store snapshot they start from, and the refit sweep after the first FFN that takes neurons (``neuron_work_s``;
the energy tap in pass 2's sweeps, about 15 ms a layer, is not in it).

    python benchmarks/calibration_vs_forward.py [--model assets/smollm2-135m-instruct] [--settings linear auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from optimize_vs_forward import timed_forward as forward_seconds
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.calibration.calibrate import Calibrator, calibrate_model
from subfit_onnx.calibration.text import calibration_tokens
from subfit_onnx.config import SubFitConfig

REPO = Path(__file__).resolve().parents[1]


class NeuronWork:
    """Seconds spent in the ``Calibrator`` methods that only neuron bypasses call, outermost calls only."""

    METHODS = ("_with_neurons", "_snapshot_outputs_with", "refit_ffns_with_neurons")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        for name in self.METHODS:
            setattr(Calibrator, name, self._timed(getattr(Calibrator, name)))

    def _timed(self, method):
        def timed(cal, *args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return method(cal, *args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m-instruct"))
    ap.add_argument("--calibration", default=str(REPO / "assets" / "text" / "c4_first_half.txt"))
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--settings", nargs="+", default=["linear", "auto"], choices=["linear", "neurons", "auto"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", default=str(REPO / "benchmarks" / "results" / "calibration_vs_forward.json"))
    args = ap.parse_args()

    base = SubFitConfig(sparsity=args.sparsity)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(args.model), args.calibration, base.num_samples,
                                base.seq_len)
    batch = torch.as_tensor(tokens)
    with torch.no_grad():
        model(batch[:1, :8])  # warm-up
    runs: list[dict] = []
    work = NeuronWork()
    before = forward_seconds(model, batch, base.batch_size)
    for r in range(args.rounds):
        for setting in args.settings if r % 2 == 0 else args.settings[::-1]:
            work.seconds = 0.0
            start = time.perf_counter()
            result = calibrate_model(model, tokens, base.model_copy(update={"ffn_bypass": setting}))
            seconds = time.perf_counter() - start
            after = forward_seconds(model, batch, base.batch_size)
            forward = (before + after) / 2
            runs.append({"round": r, "setting": setting, "calibration_s": round(seconds, 2),
                         "forward_s": round(forward, 2), "ratio": round(seconds / forward, 3),
                         "neuron_work_s": round(work.seconds, 2), "neuron_work_forwards": round(work.seconds / forward, 3),
                         "removed": result.plan.depth_map(),
                         "ffns_with_neurons": sum(u.bypass.form == "neurons" for u in result.plan.removed)})
            print(json.dumps(runs[-1]), flush=True)
            before = after
    summary = {s: {"median_ratio": round(statistics.median(x["ratio"] for x in runs if x["setting"] == s), 3),
                   "median_calibration_s": round(statistics.median(x["calibration_s"] for x in runs
                                                                   if x["setting"] == s), 2),
                   "median_neuron_work_forwards": round(statistics.median(x["neuron_work_forwards"] for x in runs
                                                                          if x["setting"] == s), 3)}
               for s in args.settings}
    rows = {r: {x["setting"]: x["ratio"] for x in runs if x["round"] == r} for r in range(args.rounds)}
    if "linear" in args.settings:
        for s in args.settings:
            if s != "linear":
                summary[s]["median_added_forwards"] = round(statistics.median(
                    row[s] - row["linear"] for row in rows.values()), 3)
    out = {"model": args.model, "tokens": int(tokens.size), "sparsity": args.sparsity,
           "torch_threads": torch.get_num_threads(), "runs": runs, "summary": summary}
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
