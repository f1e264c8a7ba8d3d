"""Compile the Triton W4A8 kernels for a CUDA architecture on a machine without a GPU.

The interpreter proves the kernels compute the right numbers; it does not prove they
compile for real hardware (tl.dot shape rules, layouts, register allocation). Triton's
wheel ships ``ptxas``, so the whole pipeline down to a cubin runs on CPU: that is a CI
check, and the register / spill counts are the only performance signal available here.

    python -m w4a8_dint.kernels.triton_aot --arch 90      # every heuristic config, one line each

Needs the real (non-interpreted) triton: do not set TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from w4a8_dint.kernels import triton_w4a8 as T

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class CompiledInfo:
    name: str
    registers: Optional[int]  # per thread (None if cuobjdump is unavailable)
    spill_bytes: Optional[int]  # local-memory stack per thread; > 0 means spills
    shared_bytes: int
    ptx_fma: int  # fused multiply-adds in the PTX (must be 0: the epilogue rounds like torch)


def _resource_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _compile(fn, signature: dict, constexprs: dict, arch: int, **options) -> CompiledInfo:
    if T.INTERPRETED:
        raise RuntimeError("AOT compilation needs the real triton; unset TRITON_INTERPRET")
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    regs, stack = _resource_usage(kernel.asm["cubin"])
    return CompiledInfo(fn.__name__, regs, stack, kernel.metadata.shared, len(re.findall(r"\bfma\.rn", kernel.asm["ptx"])))


def compile_gemm(
    config: T.GemmConfig, grouped: bool, group_size: int = 128, packed: bool = True, has_bias: bool = True,
    even_k: bool = True, out_dtype: str = "bf16", arch: int = 90, two_level: bool = False,
) -> CompiledInfo:
    signature = {
        "a_ptr": "*i8", "a_scale_ptr": "*fp32", "w_ptr": "*u8" if packed else "*i8", "hs_ptr": "*fp32",
        "lut_ptr": "*i8", "lut_words_ptr": "*i32", "mult_ptr": "*u8" if two_level else "*i8", "bias_ptr": f"*{out_dtype}", "out_ptr": f"*{out_dtype}",
        "part_ptr": "*i32" if config.split_k > 1 else f"*{out_dtype}",
        "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_hn": "i32",
        "stride_mn": "i32", "stride_om": "i32", "M_BUCKET": "i32",
    }
    constexprs = dict(
        GROUPED=grouped, GROUP_SIZE=group_size if grouped else 1, PACKED=packed, DECODE=config.decode,
        TWO_LEVEL=two_level, MULT_GROUP=group_size if two_level else 1, SPLIT_K=config.split_k, HAS_BIAS=has_bias, EVEN_K=even_k, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
    )
    return _compile(T._w4a8_gemm_kernel, signature, constexprs, arch, num_warps=config.num_warps,
                    num_stages=config.num_stages, enable_fp_fusion=False)


def compile_act_quant(per_token: bool, smooth: bool, x_dtype: str = "bf16", block_k: int = 4096, arch: int = 90) -> CompiledInfo:
    signature = {"x_ptr": f"*{x_dtype}", "smooth_ptr": f"*{x_dtype}", "in_scale_ptr": "*fp32", "q_ptr": "*i8",
                 "scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
    constexprs = dict(HAS_SMOOTH=smooth, PER_TOKEN=per_token, BLOCK_K=block_k)
    return _compile(T._act_quant_kernel, signature, constexprs, arch, num_warps=8, enable_fp_fusion=False)


def compile_splitk_epilogue(grouped: bool, out_dtype: str = "bf16", arch: int = 90) -> CompiledInfo:
    signature = {"part_ptr": "*i32", "a_scale_ptr": "*fp32", "hs_ptr": "*fp32", "bias_ptr": f"*{out_dtype}",
                 "out_ptr": f"*{out_dtype}", "M": "i32", "N": "i32", "P": "i32", "stride_hn": "i32", "stride_om": "i32"}
    constexprs = dict(GROUPED=grouped, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=128)
    return _compile(T._splitk_epilogue_kernel, signature, constexprs, arch, num_warps=4, enable_fp_fusion=False)


def heuristic_configs(n: int = 4096, k: int = 4096, sms: int = 132) -> list[tuple[int, int, T.GemmConfig]]:
    """``(M, group, config)`` the heuristic picks for each M bucket (1..4096), per channel and g128."""
    out = []
    for group in (-1, 128):
        seen = set()
        for m in (1, 16, 32, 64, 128, 256, 1024, 4096):
            cfg = T.heuristic_config(m, n, k, group, None, sms=sms)
            if cfg not in seen:
                seen.add(cfg)
                out.append((m, group, cfg))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile the W4A8 Triton kernels for a CUDA arch, no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    args = p.parse_args(argv)
    for per_token in (True, False):
        print(compile_act_quant(per_token, smooth=True, arch=args.arch))
    for grouped in (False, True):
        print(compile_splitk_epilogue(grouped, arch=args.arch))
    for m, group, cfg in heuristic_configs():
        for decode in (0, 1):
            c = T.GemmConfig(**{**cfg.__dict__, "decode": decode})
            info = compile_gemm(c, grouped=group != -1, arch=args.arch)
            print(f"M<={m:<5} group={group:<4} {c}: regs={info.registers} spill={info.spill_bytes}B "
                  f"smem={info.shared_bytes}B fma={info.ptx_fma}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
