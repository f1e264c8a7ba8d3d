"""The accuracy study's command line (``python benchmarks/accuracy.py`` / ``python -m benchmarks.accuracy``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __doc__ as STUDY_DOC
from .plan import CKPT_DIR, QUICK, REPORT_MD, RESULTS_DIR, StudySettings, parts, prune_stale
from .report import keep_foreign_blocks, markdown, plots, summary_json
from .run import summary_line, calibrate_child, run_study, worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/accuracy.py", description=STUDY_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-size run (rtn vs aqas, int4, 1 layer)")
    p.add_argument("--only", default=None, help="comma-separated parts to compute: main,g64,slac,dint,zeroshot,family,noise,static,gptq,twolevel")
    p.add_argument("--report-only", action="store_true", help="compute nothing; rebuild the report from the cache")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for missing runs (each: one torch thread)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where JSON/PNG go (runs in <dir>/accuracy_runs)")
    p.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR, help="checkpoints shared by several runs wait here")
    p.add_argument("--prune", action="store_true", help="delete cached runs that the current plan does not read")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--run", default=None, help="compute just these planned runs, in this order (comma-separated labels, "
                   "as the report prints them, e.g. 'aqas dint4-a g64 gptq,aqas dint4-a pc gptq')")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, as JSON
    p.add_argument("--calibrate", default=None, help=argparse.SUPPRESS)  # internal: one calibration child, as JSON
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.calibrate:
        return calibrate_child(args.calibrate)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")

    study = QUICK if args.quick else StudySettings()
    only = args.only.split(",") if args.only else None
    known = set(parts(args.quick, study))
    if only and not set(only) <= known:
        p.error(f"unknown part(s) {sorted(set(only) - known)}; known: {sorted(known)}")
    labels = [x.strip() for x in args.run.split(",")] if args.run else None
    planned = {s.label for specs in parts(args.quick, study).values() for s in specs}
    if labels and not set(labels) <= planned:
        p.error(f"not planned: {sorted(set(labels) - planned)}")
    if not args.report_only and args.jobs == 1:
        import torch

        torch.manual_seed(0)
    runs_dir = args.results_dir / "accuracy_runs"
    if args.prune:
        for stale in prune_stale(runs_dir, args.quick):
            print(f"[accuracy] pruned stale {stale.name}", file=sys.stderr)
    res = run_study(args.quick, only, runs_dir, not args.no_progress, not args.report_only, args.jobs, args.ckpt_dir, labels)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "accuracy_quick.json" if args.quick else "accuracy.json"
    (args.results_dir / name).write_text(json.dumps(summary_json(res, study, args.quick), indent=1))
    for part, rows in res.items():
        for s, r in rows:
            print(f"{part:8s} {s.label:48s} " + ("—" if r is None else summary_line(r).split(": ", 1)[1]))
    if not args.quick:
        md = REPORT_MD if args.results_dir == RESULTS_DIR else args.results_dir / "accuracy.md"
        md.write_text(keep_foreign_blocks(markdown(res, study), md.read_text() if md.is_file() else ""))
        plots(res, study, args.results_dir)
    return 0

