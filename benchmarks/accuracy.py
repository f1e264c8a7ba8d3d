"""The accuracy study's command line; the study itself is the ``benchmarks/accuracy/`` package
(plan / run / report / cli). ``python benchmarks/accuracy.py --help`` for the commands."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: ``benchmarks.accuracy``

from benchmarks.accuracy import cli, plan, report, run  # noqa: E402  (the package, not this file)
from benchmarks.accuracy.cli import main  # noqa: E402

__all__ = ["cli", "main", "plan", "report", "run"]

if __name__ == "__main__":
    sys.exit(main())
