"""Load ``benchmarks/accuracy.py`` (a script, not a package) once for every test module here.

It is registered as ``accuracy_bench`` in ``sys.modules`` before the test modules are imported
(pytest imports a directory's conftest first): the study's dataclasses resolve their module
through ``sys.modules``, and both test files must see the same classes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if "accuracy_bench" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
