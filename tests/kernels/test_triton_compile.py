"""The Triton kernels compile for real GPUs (sm_90, sm_80) on this CPU-only machine, without spills or FMAs.

The interpreter tests prove the arithmetic; only a real compile proves tl.dot shapes, layouts
and register allocation work. Triton ships ptxas, so this runs without a GPU.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("AOT compilation needs the real triton (TRITON_INTERPRET=1 is set)", allow_module_level=True)
pytest.importorskip("triton")

from w4a8_dint.kernels import triton_aot as A  # noqa: E402
from w4a8_dint.kernels import triton_w4a8 as T  # noqa: E402


def _check(info):
    assert info.ptx_fma == 0, f"{info.name}: FMA contraction would change the float epilogue's rounding"
    if info.spill_bytes is not None:
        assert info.spill_bytes == 0, f"{info.name} spills {info.spill_bytes} B/thread"


@pytest.mark.parametrize("m,group,config", A.heuristic_configs(), ids=lambda v: str(v) if not isinstance(v, T.GemmConfig)
                         else f"{v.block_m}x{v.block_n}x{v.block_k}-s{v.split_k}-w{v.num_warps}")
def test_heuristic_gemm_configs_compile_for_h100_without_spills(m, group, config):
    _check(A.compile_gemm(config, grouped=group != -1, arch=90))


@pytest.mark.parametrize("variant", ["register-decode", "int8-weight", "ragged-k-fp16", "sm80", "two-level"])
def test_gemm_variants_compile(variant):
    cfg = T.GemmConfig(16, 64, 128, 1, 4, 4)
    if variant == "register-decode":
        info = A.compile_gemm(T.GemmConfig(16, 64, 128, 1, 4, 4, decode=1), grouped=True)
    elif variant == "int8-weight":
        info = A.compile_gemm(T.heuristic_config(16, 4096, 4096, 128, None, sms=132, packed=False), grouped=True,
                              packed=False)
    elif variant == "ragged-k-fp16":
        info = A.compile_gemm(cfg, grouped=False, even_k=False, has_bias=False, out_dtype="fp16")
    elif variant == "two-level":
        info = A.compile_gemm(T.heuristic_config(8, 4096, 4096, 64, None, sms=132, two_level=True), grouped=False,
                              group_size=64, two_level=True)
    else:
        info = A.compile_gemm(T.GemmConfig(64, 128, 64, 1, 8, 3), grouped=True, arch=80)
    _check(info)


@pytest.mark.parametrize("per_token", [True, False])
def test_act_quant_and_epilogue_compile(per_token):
    _check(A.compile_act_quant(per_token, smooth=per_token, x_dtype="bf16" if per_token else "fp16"))
    _check(A.compile_splitk_epilogue(grouped=per_token))
