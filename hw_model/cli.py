"""``w4a8 hw-report``: MAC-unit area/energy from synthesized RTL, and what they mean for a model.

Reads the cached synthesis results (``hw_model/data/synth_results.json``); ``--resynth``
regenerates them (Yosys + gate-level simulation, a few minutes). ``--model DIR`` (a float HF
model or a w4a8-dint checkpoint) recounts MACs for that model and re-measures switching energy
on its own weights and activations.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="float HF model dir or w4a8-dint checkpoint (default: the embedded SmolLM2-135M, cached activity)")
    p.add_argument("--text", default=None, help="calibration text for activations: ptb, c4, wiki or a .txt/.jsonl path "
                   "(default: the one the cached results used)")
    p.add_argument("--context", type=int, default=None, help="context length for the attention MACs (default 512)")
    p.add_argument("--lanes", type=int, default=None, help="simulated MAC lanes per layer kind for --model/--text "
                   "(default: as the cached results, 512)")
    p.add_argument("--cycles", type=int, default=None, help="cycles (dot-product length) per lane (default 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--json-out", default=None, metavar="FILE.json", help="also write the JSON report to a file")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a bar chart (unit savings, energy per token)")
    p.add_argument("--resynth", action="store_true",
                   help="re-synthesize every unit and re-measure activity, then save the results file")
    p.add_argument("--results", default=None, metavar="PATH", help="results file to read (and write with --resynth)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from w4a8_dint.hw_model import costs, report
    from w4a8_dint.hw_model.permodel import DEFAULT_CONTEXT

    path = Path(args.results) if args.results else costs.RESULTS_PATH
    for name in ("context", "lanes", "cycles"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "context" else 1):
            print(f"error: --{name} must be {'>= 0' if name == 'context' else '>= 1'}, got {v}", file=sys.stderr)
            return 2
    try:
        if args.resynth:
            results = costs.build_results(progress=True)
            costs.save_results(results, path)
            print(f"[hw-report] wrote {path}", file=sys.stderr)
        else:
            results = costs.load_results(path)
            stale = costs.stale_units(results)
            if stale:
                print(f"[hw-report] warning: RTL changed since {path.name} was generated for {stale}; "
                      "run with --resynth", file=sys.stderr)
        rep = report.build_report(args.model, args.context if args.context is not None else DEFAULT_CONTEXT,
                                  args.text, results, progress=True, lanes=args.lanes, cycles=args.cycles)
    except (costs.ResultsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.plot:
        out = report.plot(rep, args.plot)
        print(f"[hw-report] wrote {out}", file=sys.stderr)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1) + "\n")
        print(f"[hw-report] wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(report.format_text(rep))
    return 0
