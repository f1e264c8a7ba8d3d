"""Accuracy study: W4A8 methods x 4-bit formats on the embedded SmolLM2-135M (all 30 decoder layers
quantized), group-wise g64/g32 + FPTQ, GPTQ rounding and Hadamard rotation, two-level group scales, SLAC,
the dINT-table ablation, zero-shot tasks and the AQAS family ablation.

One command regenerates everything from cached runs (each run = calibrate -> evaluate -> keep a JSON
under ``benchmarks/results/accuracy_runs/`` keyed by its settings; a re-run skips every cached key)::

    python benchmarks/accuracy.py --jobs 2         # the study (resumes), then report + plots
    python benchmarks/accuracy.py --only main,g64  # some parts: main, g64, slac, dint, zeroshot, family, noise,
                                                   # static, gptq, twolevel
    python benchmarks/accuracy.py --run 'aqas dint4-a g64 gptq'  # just these planned runs, in this order
    python benchmarks/accuracy.py --report-only    # rebuild accuracy.md / .json / PNGs from the cache
    python benchmarks/accuracy.py --quick          # CI size: rtn vs aqas, int4, 1 layer, 1k tokens

(``python -m benchmarks.accuracy ...`` from the repository root is the same command.)

Outputs: ``benchmarks/results/accuracy.json``, ``benchmarks/accuracy.md``,
``benchmarks/results/accuracy_*.png`` (``--quick``: ``accuracy_quick.json`` only).

Modules: ``plan`` (which runs exist, their settings and cache keys), ``run`` (calibrate in a measured
child process, evaluate, cache; worker processes), ``report`` (tables, verdicts, plots, summary JSON),
``cli`` (the command line). Parts are listed (and computed) in priority order, so a study stopped
early has the important runs. ``--jobs N`` runs the missing runs in N worker processes (one fresh
process per run, one torch thread each), started in that order.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub at run time
