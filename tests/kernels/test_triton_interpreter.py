"""Run the Triton kernel cases (triton_cases.py) under the Triton interpreter, in a fresh process.

TRITON_INTERPRET must be set before triton is imported, and other tests in this session
(vLLM, transformers) import triton normally, so the cases get their own interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")


@pytest.mark.slow  # ~30 s of CPU (141 interpreted cases + a vLLM import), longer on a loaded box
def test_triton_kernels_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", str(CASES)],
        env=env, capture_output=True, text=True, timeout=900, cwd=CASES.parents[2],
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
