"""Suite-wide: name the machine at the top of every run, so a failure says which CPU it came from.

Numerics of the CPU kernels must not depend on the ISA (tests/vllm_w4a8/test_cpu_kernel_isa.py
reruns them with oneDNN capped to older ISAs), but when something does differ, the header is the
first thing to read.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# The ISA extensions that change which integer / bf16 code paths oneDNN and torch pick.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx512_fp16")


def cpu_description() -> tuple[str, list[str]]:
    """``(model name, present ISA flags among ISA_FLAGS)`` from /proc/cpuinfo (platform fallback)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), [f for f in ISA_FLAGS if f in present]


def pytest_report_header(config):
    model, flags = cpu_description()
    forced = os.environ.get("ONEDNN_MAX_CPU_ISA")
    lines = [f"cpu: {model}; {os.cpu_count()} cores; isa: {' '.join(flags) or 'none of ' + ','.join(ISA_FLAGS)}"]
    lines.append(f"oneDNN max ISA: {forced or 'native (ONEDNN_MAX_CPU_ISA unset)'}")
    return lines
