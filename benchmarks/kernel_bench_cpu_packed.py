"""cpu-packed (4-bit-resident CPU kernel) against the int8-expansion CPU kernels, side by side.

Per Llama-7B/8B linear shape (N x K) and M, whole-layer ``kernel.apply`` (activation quantization +
integer GEMM + epilogue, fp32 in/out) of:

* ``cpu-packed``   weights resident as 4-bit codes (kernels/cpu_packed.py, C++ in kernels/csrc)
* ``onednn-int8``  vLLM-CPU's oneDNN on the int8 expansion (only when vLLM imports)
* ``cpu-int8``     ``torch._int_mm`` on the int8 expansion

for per-channel and two-level g64 weights (dINT4-a; random codes, speed does not depend on values). One torch thread (what vLLM-CPU runs per core
here), rounds alternating between kernels, median of per-call *thread CPU time* (the box is shared:
wall clock would time the neighbours; wall medians are recorded too), with the load average.
Also the integer GEMM alone (``*_gemm``: x one scale, on pre-quantized activations), which is
what the 4-bit residency changes. Resident weight bytes of each kernel's prepared state against W8A8 int8 weights (N * K bytes;
oneDNN's prepacked copy is counted as N * K + scales, it is internal to the handler).

Variants rerun in subprocesses: ``packed-avx2`` (``W4A8_CPU_ISA=avx2``) and ``onednn-vnni``
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``, no AMX). Writes ``results/kernel_bench_cpu_packed.json``.

    nice -n 5 python benchmarks/kernel_bench_cpu_packed.py            # full grid
    nice -n 5 python benchmarks/kernel_bench_cpu_packed.py --quick    # 4096 x 4096 and 14336 x 4096 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (N, K)
    "attn_4096x4096": (4096, 4096),
    "llama7b_up_11008x4096": (11008, 4096),
    "llama7b_down_4096x11008": (4096, 11008),
    "llama8b_up_14336x4096": (14336, 4096),
    "llama8b_down_4096x14336": (4096, 14336),
}
QUICK_SHAPES = ("attn_4096x4096", "llama8b_up_14336x4096")
M_VALUES = (1, 8, 64, 256, 1024)
SCHEMES = ("per-channel", "two-level-g64")
VARIANTS = {"packed-avx2": {"W4A8_CPU_ISA": "avx2"}, "onednn-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}}


def _cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")
    return {"cpu_model": model, "isa_flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def _layer(n: int, k: int, scheme: str):
    """Random codes and scales (speed does not depend on the values; quantizing 58M weights would take minutes)."""
    from w4a8_dint import formats as F

    g = torch.Generator().manual_seed(0)
    table = F.get_format("dint4-a")
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, 1, generator=g) * 1e-3 + 1e-4
    if scheme == "per-channel":
        return F.QuantizedWeight(packed, scales, table, k), None, dict(group_size=k, scale_scheme=F.FLOAT_SCALES), table
    mult = torch.randint(1, F.max_group_mult(table) + 1, (n, k // 64), generator=g, dtype=torch.uint8)
    qw = F.QuantizedWeight(packed, scales, table, 64, mult)
    return qw, F.pack_group_mult(mult), dict(group_size=64, scale_scheme=F.TWO_LEVEL), table


def _gemm_only(name: str, kern, st: dict):
    """The integer GEMM (x one scale) on pre-quantized activations: what the int8 expansion costs, per kernel."""
    if name == "cpu-packed":
        return lambda q: torch.ops.w4a8_dint.cpu_packed_gemm(q, st["tiles"], st.get("mult"), st["comp"], st["lut"],
                                                             st["half_scales"])
    if name == "onednn-int8":
        return lambda q: kern._scaled_int_gemm(st, q)
    return lambda q: torch._int_mm(q, st["w8"].t()).float() * st["half_scales"].reshape(-1)


def _kernels(include_onednn: bool, only: tuple[str, ...] | None):
    from w4a8_dint.kernels.linear import CpuInt8Kernel, CpuPackedKernel, OneDnnInt8Kernel

    ks = [CpuPackedKernel, CpuInt8Kernel] + ([OneDnnInt8Kernel] if include_onednn else [])
    return [k for k in ks if only is None or k.name in only]


def _state_bytes(name: str, state: dict, n: int, k: int) -> int:
    if name == "onednn-int8":  # the handler's prepacked int8 weight is internal: count it as N * K
        return n * k + sum(t.numel() * t.element_size() for key, t in state.items() if key.startswith("half_scales"))
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def run_grid(shapes, m_values, rounds: int, only: tuple[str, ...] | None) -> list[dict]:
    include_onednn = False
    try:
        import vllm._custom_ops  # noqa: F401  (brings vLLM-CPU's oneDNN ops)
        from w4a8_dint.kernels.cpu_onednn import onednn_int8_available

        include_onednn = onednn_int8_available()[0]
    except Exception:  # noqa: BLE001 - no vLLM: the torch kernels only
        pass
    from w4a8_dint.kernels.cpu_packed import last_isa_path
    from w4a8_dint.kernels.linear import W4A8LayerSpec

    torch.set_num_threads(1)
    rows = []
    for shape in shapes:
        n, k = SHAPES[shape]
        for scheme in SCHEMES:
            qw, gm, kw, table = _layer(n, k, scheme)
            spec = W4A8LayerSpec(n, k, kw["group_size"], table, "per-token", kw["scale_scheme"])
            prepared = {}
            for cls in _kernels(include_onednn, only):
                kern = cls(spec)
                prepared[cls.name] = (kern, kern.prepare(qw.packed, qw.scales, gm))
            for m in m_values:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                q = torch.randint(-127, 128, (m, k), generator=torch.Generator().manual_seed(m)).to(torch.int8)
                calls = {}
                for name, (kern, st) in prepared.items():
                    calls[name] = lambda kern=kern, st=st: kern.apply(st, x)
                    calls[f"{name}_gemm"] = lambda f=_gemm_only(name, kern, st): f(q)
                for f in calls.values():  # warm-up (and first-call allocations)
                    f()
                from w4a8_dint.kernels.cpu_packed import scratch_min_m

                isa = last_isa_path() if "cpu-packed" in prepared and m < scratch_min_m() else "scratch+torch._int_mm"
                times = {name: ([], []) for name in calls}
                for _ in range(rounds):
                    for name, f in calls.items():
                        c0, w0 = time.thread_time(), time.perf_counter()
                        f()
                        times[name][0].append(time.thread_time() - c0)
                        times[name][1].append(time.perf_counter() - w0)
                row = {"shape": shape, "n": n, "k": k, "scheme": scheme, "m": m, "loadavg": os.getloadavg()[0],
                       "packed_isa_path": isa}
                for name, (cpu, wall) in times.items():
                    row[f"{name}_cpu_ms"] = round(statistics.median(cpu) * 1e3, 3)
                    row[f"{name}_wall_ms"] = round(statistics.median(wall) * 1e3, 3)
                for name in prepared:
                    row[f"{name}_bytes_vs_w8a8"] = round(_state_bytes(name, prepared[name][1], n, k) / (n * k), 4)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del prepared
    return rows


def _table(rows: list[dict], title: str) -> str:
    names = [nm for nm in ("cpu-packed", "onednn-int8", "cpu-int8") if any(f"{nm}_cpu_ms" in r for r in rows)]
    others = names[1:]
    head = f"{'shape':24s} {'scheme':13s} {'M':>5s} | layer ms: " + " ".join(f"{nm:>11s}" for nm in names)
    head += " | GEMM ms: " + " ".join(f"{nm:>11s}" for nm in names)
    head += " | packed speedup layer/GEMM vs " + ", ".join(others) + " | bytes/W8A8 " + " ".join(names)
    out = [f"== {title} ==", head]
    for r in rows:
        line = f"{r['shape']:24s} {r['scheme']:13s} {r['m']:5d} |           "
        line += " ".join(f"{r[nm + '_cpu_ms']:11.3f}" for nm in names) + " |          "
        line += " ".join(f"{r[nm + '_gemm_cpu_ms']:11.3f}" for nm in names) + " | "
        line += ", ".join(f"{r[nm + '_cpu_ms'] / r['cpu-packed_cpu_ms']:.2f}x/{r[nm + '_gemm_cpu_ms'] / r['cpu-packed_gemm_cpu_ms']:.2f}x"
                          for nm in others)
        line += " | " + " ".join(f"{r[nm + '_bytes_vs_w8a8']:.3f}" for nm in names)
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--m", type=int, nargs="*", default=list(M_VALUES))
    ap.add_argument("--variant-m", type=int, nargs="*", default=[1, 8, 64], help="M values of the subprocess variants")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--shapes", nargs="*", default=None)
    args = ap.parse_args()
    shapes = args.shapes or (QUICK_SHAPES if args.quick else tuple(SHAPES))

    if args.child:
        only = ("cpu-packed", "onednn-int8")
        print(json.dumps(run_grid(shapes, args.m, args.rounds, only)))
        return

    info = {**_cpu_info(), "torch": torch.__version__, "threads": 1, "loadavg_start": os.getloadavg(),
            "timing": "median of per-call thread CPU time over alternating rounds (wall medians too)",
            "rounds": args.rounds}
    rows = run_grid(shapes, args.m, args.rounds, None)
    print(_table(rows, "native ISA (cpu-packed's best path: amx where present; oneDNN with AMX where present)"))
    variants = {}
    for name, env in VARIANTS.items():
        cmd = [sys.executable, __file__, "--child", name, "--rounds", str(args.rounds), "--shapes", *shapes,
               "--m", *map(str, args.variant_m)]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            variants[name] = {"error": proc.stderr[-2000:]}
            print(f"variant {name} failed:\n{proc.stderr[-2000:]}")
            continue
        variants[name] = {"env": env, "rows": json.loads(proc.stdout.strip().splitlines()[-1])}
        print(_table(variants[name]["rows"], f"variant {name} ({env})"))
    info["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "kernel_bench_cpu_packed.json"
    out.write_text(json.dumps({"info": info, "rows": rows, "variants": variants}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
