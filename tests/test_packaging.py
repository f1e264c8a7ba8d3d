"""Packaging rules: one import namespace, a working console script, one home for the code tables."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["calibrate", "kernels", "hf_integration", "vllm_w4a8", "hw_model"]
PRODUCT_DIRS = ["w4a8_dint", *SUBPACKAGES]


def _run(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_console_script_lists_subcommands():
    exe = Path(sys.executable).with_name("w4a8")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    for cmd in ("calibrate", "eval", "validate", "push", "hw-report", "demo"):
        assert re.search(rf"^\s+{cmd}\b", out, re.M), cmd


def test_subpackages_live_only_under_the_namespace(tmp_path):
    out = _run(
        "import importlib, importlib.util, json\n"
        f"bare = {{n: importlib.util.find_spec(n) is not None for n in {SUBPACKAGES!r}}}\n"
        f"ns = {{n: importlib.import_module('w4a8_dint.' + n).__name__ for n in {SUBPACKAGES!r}}}\n"
        "print(json.dumps([bare, ns]))",
        cwd=tmp_path,  # outside the repo: only what is installed is visible
    )
    import json

    bare, ns = json.loads(out)
    assert not any(bare.values()), f"bare top-level modules installed: {bare}"
    assert all(v.startswith("w4a8_dint.") for v in ns.values())


def test_transformers_kernels_probe_is_not_fooled_from_the_repo_root():
    # From the repo root the folder `kernels/` is importable as a bare module; transformers
    # probes `kernels` and must neither crash nor think the PyPI package is installed.
    out = _run("from transformers.utils.import_utils import is_kernels_available as f; print(f())", cwd=REPO)
    assert out.strip() == "False"


@pytest.mark.parametrize("folder", SUBPACKAGES)
def test_top_level_folder_init_has_no_imports(folder):
    tree = ast.parse((REPO / folder / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _value_spellings(values):
    nums = [f"{v:g}" for v in values]
    yield ", ".join(nums)
    yield ", ".join(f"{float(v)!r}" for v in values)


def test_code_tables_are_defined_only_in_the_format_module():
    from w4a8_dint import formats as F

    needles = set()
    for t in F.FORMATS.values():
        used = sorted({t.values[c] for c in t.used_codes})
        pos = [v for v in used if v > 0]
        halves = sorted({t.half_values[c] for c in t.used_codes if t.half_values[c] > 0})
        for seq in (used, pos, halves, t.values, t.half_values):
            for s in _value_spellings(seq):
                if s.count(",") >= 5:
                    needles.add(s)
    offenders = []
    for d in PRODUCT_DIRS:
        for path in (REPO / d).rglob("*.py"):
            if path == REPO / "w4a8_dint" / "formats.py":
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    assert not offenders, offenders
