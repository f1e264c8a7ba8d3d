"""W4A8 kernel speed, measured side by side against the baselines on the same device in one run.

CUDA (``--device cuda``, the default when a GPU is visible): ``triton.testing.do_bench``
(median ms) of, per Llama-3-8B linear shape (N, K) and M in {1, 16, 64, 128, 256, 1024}:

* ``fp16``         ``torch.nn.functional.linear`` in fp16 (the reference point of every ratio)
* ``int_mm_w8a8``  ``torch._int_mm`` int8 x int8 -> int32 (the GEMM alone; no quantization, no scales)
* ``marlin_w4a16`` / ``marlin_w4a8``  vLLM's Marlin (uint4b8 weights; fp16 or INT8 activations), if vLLM imports
* ``w4a8_linear``  ours, whole layer: Triton activation quantization + W4A8 GEMM (``torch.ops.w4a8_dint.w4a8_linear``)
* ``w4a8_gemm``    ours, GEMM only on pre-quantized activations, table decode in registers (``decode=1``)
* ``w4a8_gemm_lutload``  the same with the table gathered from memory (``decode=0``)

each for per-channel and group-128 weights (dINT4-a table). Ratios are ``fp16_ms / x_ms``
(>1 is faster than fp16). ``W4A8_DINT_AUTOTUNE=1`` autotunes our block sizes instead of the
heuristic. Issue targets (H100): >= 3x fp16 at M <= 16, >= 1.5x at M = 256.

CPU (``--device cpu``): the interpreter-free CPU int8 path (the op's torch path: ``torch._int_mm``
per group, bit-exact with the reference) against bf16 ``F.linear``, SmolLM2-135M and one Llama
shape, one torch thread (what vLLM-CPU uses on this 2-core box), timed in process CPU time (best
of interleaved rounds: the machine is shared, so wall clock would measure the neighbours).

CPU two-level (``--device cpu --two-level``): group-64 weights as ONE int8 GEMM per layer (two-level
scales: int8 expansion ``2v * m``, per-channel epilogue) against the same weights with float group
scales (one GEMM per group) and bf16, through vLLM-CPU's oneDNN (``onednn-int8``, when vLLM-CPU is
installed) and the plain torch path (``cpu-int8``, ``torch._int_mm``), SmolLM2 shapes and 4096x4096,
M in {1, 8, 64, 256}; writes ``kernel_bench_cpu_two_level.json`` with the CPU model and ISA flags.

Writes ``benchmarks/results/kernel_bench_<device>.json``.

    python benchmarks/kernel_bench.py                 # whatever device is there
    python benchmarks/kernel_bench.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_8B_SHAPES = {  # name: (N, K) = (out_features, in_features)
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}
SMOLLM2_SHAPES = {
    "q_proj": (576, 576),
    "kv_proj": (192, 576),
    "gate_up_proj": (3072, 576),
    "down_proj": (576, 1536),
}
GPU_M = (1, 16, 64, 128, 256, 1024)
CPU_M = (1, 16, 64, 256)
FORMAT = "dint4-a"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _random_layer(n: int, k: int, group: int, device: str, seed: int = 0):
    """Random packed codes and positive scales (speed does not depend on the values)."""
    from w4a8_dint.formats import get_format

    g = torch.Generator(device="cpu").manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    groups = 1 if group == -1 else k // group
    half_scales = torch.rand(n, groups, generator=g) * 1e-3 + 1e-4
    lut = get_format(FORMAT).expansion_lut()
    return packed.to(device), half_scales.to(device), lut.to(device)


# -- CUDA ------------------------------------------------------------------------------------

def _cuda_timer(warmup: int, rep: int, cudagraph: bool) -> Callable[[Callable[[], object]], float]:
    """``do_bench`` median ms; ``cudagraph`` replays a captured graph instead (no Python launch gaps,
    which is how vLLM runs decode-sized batches)."""
    import triton.testing

    if cudagraph:
        return lambda fn: float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _try(label: str, build: Callable[[], Callable[[], object]], timer, errors: dict) -> Optional[float]:
    """Build a runner and time it; a baseline that cannot run is recorded with its reason, not fatal."""
    try:
        fn = build()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return timer(fn)
    except Exception as e:  # noqa: BLE001 - baselines are optional (missing vLLM, unsupported shape)
        errors.setdefault(label, f"{type(e).__name__}: {e}".splitlines()[0][:300])
        return None


def _marlin_builder(x16: torch.Tensor, n: int, k: int, group: int, act_int8: bool):
    """vLLM Marlin (GPTQ uint4b8 symmetric). API details move between vLLM versions, hence the guards."""
    def build():
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.scalar_type import scalar_types

        dev = x16.device
        w = torch.randn(k, n, dtype=torch.float16, device=dev) * 0.02
        input_dtype = torch.int8 if act_int8 else None
        _, q_w, s = marlin_quantize(w, scalar_types.uint4b8, group, input_dtype=input_dtype)
        global_scale = None
        if act_int8:
            if group != -1:
                s, global_scale = mu.marlin_act_int8_process_scales(s)
            else:
                global_scale = torch.ones(1, device=dev)
        zp = mu.marlin_make_empty(dev) if hasattr(mu, "marlin_make_empty") else mu.marlin_make_empty_g_idx(dev)
        kwargs = dict(input=x16, weight=q_w, weight_scale=s, weight_zp=zp, workspace=None, wtype=scalar_types.uint4b8,
                      output_size_per_partition=n, input_size_per_partition=k, bias=None)
        if act_int8:
            kwargs.update(input_global_scale=global_scale, input_dtype=torch.int8)
        return lambda: mu.apply_gptq_marlin_linear(**kwargs)

    return build


def _check_exact(name: str, n: int, k: int, group: int, layer, device: str) -> dict[str, bool]:
    """On this device: Triton output == the reference integer path, bit for bit (both table decodes, split-K or not)."""
    from w4a8_dint.kernels import ops
    from w4a8_dint.kernels import triton_w4a8 as T

    packed, half, lut = layer
    out = {}
    for m in (1, 33):
        x = torch.randn(m, k, dtype=torch.float16, device=device) * 3
        q, s = ops._quantize_activation_torch(x, "per-token", None, None)
        want = ops._w4a8_gemm_torch(q, s, packed, half, lut, group, None, torch.float16)
        for decode in (0, 1):
            cfg = T.GemmConfig(**{**T.heuristic_config(m, n, k, group, x.device).__dict__, "decode": decode})
            got = T.w4a8_linear_triton(x, packed, half, lut, group, config=cfg)
            tag = "pc" if group == -1 else f"g{group}"
            out[f"{name}/{tag}/M={m}/split={cfg.split_k}/decode={decode}"] = bool(torch.equal(got, want))
    return out


def bench_cuda(m_values, shapes, groups, timer: Callable[[Callable[[], object]], float], device: str = "cuda") -> dict:
    """``device`` / ``timer`` are parameters only so the interpreter test can dry-run this path on CPU."""
    import triton

    from w4a8_dint.kernels import ops  # noqa: F401  (registers the ops)
    from w4a8_dint.kernels import triton_w4a8 as T

    rows, errors, exact = [], {}, {}
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        w16 = torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
        w8_t = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)  # [K, N] for _int_mm
        layers = {g: _random_layer(n, k, g, device) for g in groups}
        for g in groups:
            exact.update(_check_exact(name, n, k, g, layers[g], device))
        for m in m_values:
            x16 = torch.randn(m, k, dtype=torch.float16, device=device)
            q_x, s_x = T.quantize_activation_triton(x16, "per-token")
            row = {"shape": name, "N": n, "K": k, "M": m}
            row["fp16_ms"] = _try("fp16", lambda: (lambda: torch.nn.functional.linear(x16, w16)), timer, errors)
            row["int_mm_w8a8_ms"] = _try(f"int_mm M={m}", lambda: (lambda: torch._int_mm(q_x, w8_t)), timer, errors)
            for g in groups:
                tag = "pc" if g == -1 else f"g{g}"
                packed, half, lut = layers[g]
                cfg = T.heuristic_config(m, n, k, g, x16.device)
                row[f"config_{tag}"] = cfg.__dict__
                row[f"w4a8_linear_{tag}_ms"] = _try(
                    f"w4a8_linear {tag}", lambda: (lambda: torch.ops.w4a8_dint.w4a8_linear(
                        x16, packed, half, lut, g, "per-token", None, None, None)), timer, errors)
                for decode, label in ((1, "w4a8_gemm"), (0, "w4a8_gemm_lutload")):
                    c = T.GemmConfig(**{**cfg.__dict__, "decode": decode})
                    row[f"{label}_{tag}_ms"] = _try(
                        f"{label} {tag}", lambda: (lambda: T.w4a8_gemm_triton(
                            q_x, s_x, packed, half, lut, g, None, torch.float16, config=c)), timer, errors)
                row[f"marlin_w4a16_{tag}_ms"] = _try(f"marlin_w4a16 {tag}", _marlin_builder(x16, n, k, g, False), timer, errors)
                row[f"marlin_w4a8_{tag}_ms"] = _try(f"marlin_w4a8 {tag}", _marlin_builder(x16, n, k, g, True), timer, errors)
            fp16 = row["fp16_ms"]
            for key in [k_ for k_ in row if k_.endswith("_ms") and k_ != "fp16_ms"]:
                row[key.replace("_ms", "_speedup_vs_fp16")] = (fp16 / row[key]) if fp16 and row[key] else None
            rows.append(row)
            _print_row(row)
    dev = torch.cuda.get_device_name() if device == "cuda" else device
    return {"device": dev, "device_kind": device, "torch": torch.__version__, "triton": triton.__version__,
            "autotune": T.autotune_enabled(), "exact_vs_reference": exact, "rows": rows, "errors": errors,
            "targets": _targets(rows, groups)}


def _targets(rows, groups) -> dict:
    """Issue targets on H100: >= 3x fp16 at M <= 16, >= 1.5x at M = 256 (whole layer, per shape)."""
    out = {}
    for g in groups:
        tag = "pc" if g == -1 else f"g{g}"
        key = f"w4a8_linear_{tag}_speedup_vs_fp16"
        small = [r[key] for r in rows if r["M"] <= 16 and r.get(key)]
        mid = [r[key] for r in rows if r["M"] == 256 and r.get(key)]
        out[tag] = {
            "min_speedup_M<=16": min(small) if small else None, "target_M<=16": 3.0,
            "min_speedup_M=256": min(mid) if mid else None, "target_M=256": 1.5,
        }
    return out


def _print_row(row: dict) -> None:
    ratios = {k.replace("_speedup_vs_fp16", ""): v for k, v in row.items() if k.endswith("_speedup_vs_fp16") and v}
    txt = " ".join(f"{k}={v:.2f}x" for k, v in ratios.items())
    fp16 = row.get("fp16_ms") or row.get("bf16_ms")
    print(f"{row['shape']:>13} M={row['M']:<5} N={row['N']:<6} K={row['K']:<6} base={fp16 and f'{fp16:.4f}ms'} {txt}",
          flush=True)


# -- CPU -------------------------------------------------------------------------------------

def _cpu_best_ms(fns: dict[str, Callable[[], object]], rounds: int, round_s: float = 0.02) -> dict[str, float]:
    """Best-of-rounds *process CPU time* per call (ms), candidates interleaved round by round.

    The dev machine is shared (load averages of 7-10 on 2 cores while this was written): wall
    clock then measures the neighbours. With one torch thread, process CPU time measures the
    kernel's own work; the best of interleaved rounds drops cache-pollution outliers, and
    interleaving keeps the ratio fair.
    """
    clock = time.process_time
    calls = {}
    with torch.inference_mode():
        for name, fn in fns.items():  # warm up, then size a round to ~round_s
            fn()
            t0 = clock()
            fn()
            calls[name] = max(1, int(round_s / max(clock() - t0, 1e-5)))
        best = {name: float("inf") for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = clock()
                for _ in range(calls[name]):
                    fn()
                best[name] = min(best[name], (clock() - t0) / calls[name] * 1e3)
    return best


def bench_cpu(m_values, shapes, groups_for, rounds: int) -> dict:
    from w4a8_dint.formats import expand_to_int8, get_format
    from w4a8_dint.kernels.linear import CpuInt8Kernel, W4A8LayerSpec

    rows = []
    table = get_format(FORMAT)
    for name, (n, k) in shapes.items():
        wbf = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        for g in groups_for(k):
            packed, half, _ = _random_layer(n, k, g, "cpu")
            spec = W4A8LayerSpec(n, k, k if g == -1 else g, table, "per-token")
            kern = CpuInt8Kernel(spec)
            state = kern.prepare(packed, half * 2)
            assert torch.equal(state["w8"], expand_to_int8(packed, table))
            tag = "pc" if g == -1 else f"g{g}"
            for m in m_values:
                xbf = torch.randn(m, k).to(torch.bfloat16)
                xf = xbf.float()
                t = _cpu_best_ms({
                    "bf16": lambda: torch.nn.functional.linear(xbf, wbf),
                    "w4a8_bf16in": lambda: kern.apply(state, xbf),
                    "w4a8_fp32in": lambda: kern.apply(state, xf),
                }, rounds)
                row = {"shape": name, "N": n, "K": k, "M": m, "group": tag, "bf16_ms": t["bf16"],
                       "w4a8_cpu_int8_ms": t["w4a8_bf16in"], "w4a8_cpu_int8_fp32in_ms": t["w4a8_fp32in"]}
                row["w4a8_cpu_int8_speedup_vs_bf16"] = t["bf16"] / t["w4a8_bf16in"]
                row["shape"] = f"{name}/{tag}"
                rows.append(row)
                print(f"{row['shape']:>17} M={m:<4} N={n:<5} K={k:<5} bf16={t['bf16']:.4f}ms "
                      f"w4a8-cpu-int8={t['w4a8_bf16in']:.4f}ms  ratio(bf16/w4a8)={row['w4a8_cpu_int8_speedup_vs_bf16']:.2f}x",
                      flush=True)
    return {"device": platform.processor() or platform.machine(), "device_kind": "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "timer": f"process CPU time, best of {rounds} interleaved rounds",
            "load_average_at_end": os.getloadavg(),
            "rows": rows}


def cpu_isa() -> dict:
    """CPU model and the ISA flags that decide oneDNN's int8 / bf16 code paths."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if model:
        info["model"] = model.group(1).strip()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    if flags:
        info["flags"] = [f for f in wanted if f in flags.group(1).split()]
    info["ONEDNN_MAX_CPU_ISA"] = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return info


def bench_cpu_two_level(m_values, shapes, group: int, rounds: int) -> dict:
    """Two-level (one GEMM) vs float group scales (one GEMM per group) vs bf16, oneDNN and torch paths."""
    from w4a8_dint import formats as F
    from w4a8_dint.config import quantized_weight_tensors
    from w4a8_dint.kernels.base import W4A8LayerSpec

    try:  # vLLM-CPU's oneDNN ops are available only where vLLM is loaded
        import vllm._custom_ops  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    from w4a8_dint.kernels.cpu_onednn import OneDnnInt8Kernel, onednn_int8_available
    from w4a8_dint.kernels.linear import CpuInt8Kernel

    has_onednn, why = onednn_int8_available()
    table = F.get_format(FORMAT)
    rows, exact = [], {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
        wbf = w.to(torch.bfloat16)
        two = F.quantize_two_level(w, table, group)
        flt = F.quantize_weight(w, table, group)
        mult = quantized_weight_tensors("p", two)["p.weight_group_mult"]
        variants = {"two_level": (F.TWO_LEVEL, two, mult), "float_groups": (F.FLOAT_SCALES, flt, None)}
        kernels = {}
        for kname, cls in (("onednn", OneDnnInt8Kernel), ("cpu_int8", CpuInt8Kernel)):
            if kname == "onednn" and not has_onednn:
                continue
            for vname, (scheme, qw, gm) in variants.items():
                kern = cls(W4A8LayerSpec(n, k, group, table, "per-token", scheme, out_dtype=torch.bfloat16))
                kernels[f"{kname}_{vname}"] = (kern, kern.prepare(qw.packed, qw.scales, gm))
        for m in m_values:
            xbf = torch.randn(m, k).to(torch.bfloat16)
            fns = {"bf16": lambda: torch.nn.functional.linear(xbf, wbf)}
            fns.update({kn: (lambda kern=kern, st=st: kern.apply(st, xbf)) for kn, (kern, st) in kernels.items()})
            if m == m_values[0]:  # both paths compute the same bits for the same weights
                for vname in variants:
                    outs = [fns[f"{kn}_{vname}"]() for kn in ("onednn", "cpu_int8") if f"{kn}_{vname}" in fns]
                    exact[f"{name}/{vname}"] = all(torch.equal(outs[0], o) for o in outs[1:])
            t = _cpu_best_ms(fns, rounds)
            row = {"shape": name, "N": n, "K": k, "M": m, "group": group, **{f"{kn}_ms": v for kn, v in t.items()}}
            for kn in kernels:
                row[f"{kn}_speedup_vs_bf16"] = t["bf16"] / t[kn]
            for kn in ("onednn", "cpu_int8"):
                if f"{kn}_two_level" in t:
                    row[f"{kn}_two_level_vs_float_groups"] = t[f"{kn}_float_groups"] / t[f"{kn}_two_level"]
            rows.append(row)
            print(f"{name:>13} M={m:<4} " + " ".join(f"{kn}={v:.3f}ms" for kn, v in t.items()), flush=True)
    return {"device": cpu_isa(), "device_kind": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "format": FORMAT, "onednn": has_onednn, "onednn_unavailable_reason": why,
            "timer": f"process CPU time, best of {rounds} interleaved rounds",
            "same_bits_onednn_vs_torch": exact, "load_average_at_end": os.getloadavg(), "rows": rows}


# -- main ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--cudagraph", action="store_true", help="CUDA: time CUDA-graph replays (do_bench_cudagraph)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1, like vLLM-CPU here)")
    p.add_argument("--two-level", action="store_true",
                   help="CPU: two-level scales (one GEMM) vs float group scales (one GEMM per group) vs bf16")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernel_bench_<device>.json)")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("refusing to benchmark under TRITON_INTERPRET=1 (interpreter timings are meaningless)", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2

    started = time.time()
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            print("the CUDA benchmark needs triton (pip install triton)", file=sys.stderr)
            return 2
        shapes = dict(list(LLAMA3_8B_SHAPES.items())[:2]) if args.quick else LLAMA3_8B_SHAPES
        m_values = (1, 16, 256) if args.quick else GPU_M
        warmup, rep = (25, 50) if args.quick else (100, 300)
        result = bench_cuda(m_values, shapes, groups=(-1, 128), timer=_cuda_timer(warmup, rep, args.cudagraph))
        bench_fn = "do_bench_cudagraph" if args.cudagraph else "do_bench"
        result["timer"] = f"triton.testing.{bench_fn} median ms, warmup={warmup} ms, rep={rep} ms"
        suffix = "_cudagraph" if args.cudagraph else ""
        default_name = f"kernel_bench_{_slug(torch.cuda.get_device_name())}{suffix}.json"
    elif args.two_level:
        torch.set_num_threads(args.threads)
        shapes = {**SMOLLM2_SHAPES, "4096x4096": LLAMA3_8B_SHAPES["o_proj"]}
        m_values = (1, 8) if args.quick else (1, 8, 64, 256)
        result = bench_cpu_two_level(m_values, shapes, group=64, rounds=2 if args.quick else 3)
        default_name = "kernel_bench_cpu_two_level.json"
    else:
        torch.set_num_threads(args.threads)
        shapes = {**SMOLLM2_SHAPES, "llama_o_proj": LLAMA3_8B_SHAPES["o_proj"]}
        if args.quick:
            shapes = {"q_proj": SMOLLM2_SHAPES["q_proj"], "llama_o_proj": LLAMA3_8B_SHAPES["o_proj"]}
        m_values = (1, 16) if args.quick else CPU_M
        result = bench_cpu(m_values, shapes, groups_for=lambda k: (-1, 64 if k % 128 else 128),
                           rounds=3 if args.quick else 7)
        default_name = "kernel_bench_cpu.json"
    result.update(python=sys.version.split()[0], wall_s=round(time.time() - started, 1),
                  command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    out = args.out or RESULTS / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if result.get("errors"):
        print("baselines that did not run:", json.dumps(result["errors"], indent=2))
    if result.get("exact_vs_reference"):
        bad = [k for k, ok in result["exact_vs_reference"].items() if not ok]
        print("bit-exact vs reference:", "all" if not bad else f"MISMATCH in {bad}")
    if result.get("targets"):
        print("targets:", json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # noqa: BLE001 - print the whole story, exit non-zero
        traceback.print_exc()
        sys.exit(1)
