"""W4A8 as ``torch.library`` custom ops, so compiled graphs (vLLM) and eager code (HF) call the same thing.

Importing this module registers three ops in the ``w4a8_dint`` namespace. Each has a
fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it
without running it. Signatures are stable:

``torch.ops.w4a8_dint.w4a8_linear(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias, group_mult=None, weight_absmax=None) -> Tensor``
    The whole layer: ``x / smooth`` -> INT8 activation quantization -> integer GEMM ->
    float32 epilogue (+ bias) -> ``x.dtype``. Bit-identical to
    ``reference.w4a8_linear_reference`` on CPU (and on CUDA, see ``kernels/triton_w4a8.py``).

    * ``x``            float ``[..., K]`` (fp32 / bf16 / fp16); the output is ``[..., N]`` in ``x.dtype``
    * ``weight``       either ``int8 [N, K]``: the int8 expansion (2 * value; what the CPU kernel keeps)
                       or ``uint8 [N, K // 2]``: packed codes in the formats.py layout (what the GPU kernel keeps)
    * ``half_scales``  float32 ``[N, K // group_size]`` = ``weight_scale / 2``
    * ``lut``          int8 ``[16]`` = ``CodeTable.expansion_lut()``; decodes packed codes (unused for int8 weights)
    * ``group_size``   the effective group size (``K`` for per channel; ``-1`` is accepted as per channel)
    * ``act_mode``     ``"per-token"`` (dynamic) or ``"per-tensor"`` (static, needs ``input_scale``)
    * ``input_scale``  float32 ``[1]`` or ``None``
    * ``smooth_scale`` float ``[K]`` or ``None``; the input is divided by it before quantization
    * ``bias``         float ``[N]`` or ``None``; added in float32 after the scales
    * ``group_mult``   ``None``, or two-level weights (formats.py): ``uint8 [N, K // group_size]`` integer
                       multipliers of packed codes; ``half_scales`` is then per channel ``[N, 1]`` (``s / 2``)
                       and the layer is one integer GEMM (CPU callers pass the int8 expansion ``2v * m``
                       instead, with ``group_size = K`` and no ``group_mult``)
    * ``weight_absmax`` ``None`` or ``max |int8 expansion|``, computed once at load by the kernel: on CPUs
                       whose int8 GEMM saturates (no VNNI) it decides the exact weight split
                       (``reference._int_mm``) without reducing the weight on every call

``torch.ops.w4a8_dint.quantize_activation(x, act_mode, input_scale, smooth_scale) -> (q, scale)``
    ``x [M, K]`` -> ``q int8 [M, K]``, ``scale float32 [M, 1]`` (the first half of the layer).

``torch.ops.w4a8_dint.w4a8_gemm(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, group_mult=None) -> Tensor``
    ``q_x int8 [M, K]``, ``act_scale float32 [M, 1]`` -> ``out_dtype [M, N]`` (the second half).

``torch.ops.w4a8_dint.cpu_packed_gemm(q_x, tiles, group_mult, comp, lut, half_scales) -> Tensor``
    The 4-bit-resident CPU kernel's GEMM (``kernels/cpu_packed.py``; C++ in ``kernels/csrc``):
    ``q_x int8 [M, K]`` and a weight in that kernel's packed layout -> float32 ``fl(acc * half_scales[n])``
    ``[M, N]`` (``acc`` the exact int32 accumulator); the caller finishes the epilogue. CPU only.

Dispatch is by device: CPU (and any device without a registered kernel) runs the exact
torch path of ``reference`` (``torch._int_mm`` per group); CUDA runs the Triton kernels
unless Triton is missing or ``W4A8_DINT_DISABLE_TRITON=1``. The ops never synchronise
with the host on CUDA (no data-dependent checks), so they are CUDA-graph safe; the
input checks here are about shapes and dtypes only.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from w4a8_dint.formats import PER_CHANNEL, FormatError, multiply_groups, unpack_codes
from w4a8_dint.reference import (
    ACT_MODES, cpu_int8_gemm_exact_full_range, int_matmul_grouped, quantize_activation, w4a8_epilogue,
)

NAMESPACE = "w4a8_dint"
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- shape checks (shared by the real and the fake implementations) ----------------------

def weight_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(N, K)`` of an int8 expansion ``[N, K]`` or a packed ``uint8 [N, K // 2]`` weight."""
    if weight.dim() != 2:
        raise FormatError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if weight.dtype == torch.int8:
        return weight.shape[0], weight.shape[1]
    if weight.dtype == torch.uint8:
        return weight.shape[0], weight.shape[1] * 2
    raise FormatError(f"weight must be int8 [N, K] (expanded) or uint8 [N, K//2] (packed), got {weight.dtype}")


def effective_group_size(k: int, group_size: int) -> int:
    return k if group_size == PER_CHANNEL else group_size


def check_gemm_args(
    k: int, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor, group_size: int,
    bias: Optional[torch.Tensor], group_mult: Optional[torch.Tensor] = None,
) -> tuple[int, int]:
    """Validate shapes; return ``(N, effective group size)``."""
    n, wk = weight_shape(weight)
    if wk != k:
        raise FormatError(f"activation K={k} does not match weight K={wk}")
    g = effective_group_size(k, group_size)
    if g <= 0 or k % g:
        raise FormatError(f"group size {group_size} does not divide K={k}")
    if group_mult is not None:
        if weight.dtype != torch.uint8:
            raise FormatError("group_mult (two-level scales) goes with packed uint8 codes; pass int8 expansions without it")
        if group_mult.dtype != torch.uint8 or tuple(group_mult.shape) != (n, k // g):
            raise FormatError(f"group_mult must be uint8 [N, K // G] = {(n, k // g)}, got "
                              f"{group_mult.dtype} {tuple(group_mult.shape)}")
        if tuple(half_scales.shape) != (n, 1):
            raise FormatError(f"two-level half_scales must be per channel [N, 1] = {(n, 1)}, got {tuple(half_scales.shape)}")
    elif tuple(half_scales.shape) != (n, k // g):
        raise FormatError(f"half_scales must be [N, K // G] = {(n, k // g)}, got {tuple(half_scales.shape)}")
    if weight.dtype == torch.uint8 and (lut.dtype != torch.int8 or lut.numel() != 16):
        raise FormatError(f"lut must be int8 [16] (CodeTable.expansion_lut()), got {lut.dtype} {tuple(lut.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise FormatError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")
    return n, g


def check_act_args(k: int, act_mode: str, input_scale: Optional[torch.Tensor], smooth_scale: Optional[torch.Tensor]) -> None:
    if act_mode not in ACT_MODES:
        raise FormatError(f"unknown activation mode {act_mode!r}; expected one of {ACT_MODES}")
    if act_mode == "per-tensor" and input_scale is None:
        raise FormatError("per-tensor activation mode needs a calibrated input_scale")
    if input_scale is not None and input_scale.numel() != 1:
        raise FormatError(f"input_scale must hold one value, got shape {tuple(input_scale.shape)}")
    if smooth_scale is not None and tuple(smooth_scale.shape) != (k,):
        raise FormatError(f"smooth_scale must be [K] = [{k}], got {tuple(smooth_scale.shape)}")


# -- the exact torch path (CPU; also the fallback on any device) --------------------------

def expand_weight(
    weight: torch.Tensor, lut: torch.Tensor, group_mult: Optional[torch.Tensor] = None, group_size: int = PER_CHANNEL,
) -> torch.Tensor:
    """int8 ``[N, K]`` expansion; packed weights go through ``lut`` (the format's table, never a copy).

    Two-level weights (``group_mult``) come out as ``2v * m``: one integer GEMM with a per-channel epilogue.
    """
    if weight.dtype == torch.int8:
        return weight
    w8 = lut.to(weight.device)[unpack_codes(weight).long()]
    return w8 if group_mult is None else multiply_groups(w8, group_mult, group_size)


def _quantize_activation_torch(
    x: torch.Tensor, act_mode: str, input_scale: Optional[torch.Tensor], smooth_scale: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    if smooth_scale is not None:
        xf = xf / smooth_scale.float()
    q, s = quantize_activation(xf, act_mode, input_scale)
    # Per-tensor scales come back as a broadcast view of input_scale; custom ops must not alias inputs.
    return q, s.contiguous().clone() if act_mode == "per-tensor" else s


def _w4a8_gemm_torch(
    q_x: torch.Tensor, act_scale: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor,
    group_size: int, bias: Optional[torch.Tensor], out_dtype: torch.dtype, group_mult: Optional[torch.Tensor] = None,
    weight_absmax: Optional[int] = None,
) -> torch.Tensor:
    k = q_x.shape[1]
    w8 = expand_weight(weight, lut, group_mult, group_size)
    g = k if group_mult is not None else effective_group_size(k, group_size)  # two-level: one GEMM
    half_scales = half_scales.float()
    if g == k:
        y = w4a8_epilogue(int_matmul_grouped(q_x, w8, g, weight_absmax), half_scales, act_scale.float())
    else:
        # reference.w4a8_epilogue's exact float order, one group at a time: never materialises the
        # [G, M, N] int32 partials (134 MB at M=256 for a 4096x4096 g128 layer) or the temporaries.
        hs_rows = half_scales.t().contiguous()  # [G, N]: each group's scales contiguous
        y = int_matmul_grouped(q_x[:, :g], w8[:, :g], g, weight_absmax)[0].float().mul_(hs_rows[0])
        for i in range(1, k // g):
            part = int_matmul_grouped(q_x[:, i * g:(i + 1) * g], w8[:, i * g:(i + 1) * g], g, weight_absmax)[0]
            y.add_(part.float().mul_(hs_rows[i]))
        y.mul_(act_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _triton_enabled() -> bool:
    return os.environ.get("W4A8_DINT_DISABLE_TRITON", "0") != "1" and importlib.util.find_spec("triton") is not None


# -- op: quantize_activation ---------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::quantize_activation", mutates_args=())
def quantize_activation_op(
    x: torch.Tensor, act_mode: str, input_scale: Optional[torch.Tensor], smooth_scale: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2:
        raise FormatError(f"quantize_activation takes x [M, K], got shape {tuple(x.shape)}")
    check_act_args(x.shape[1], act_mode, input_scale, smooth_scale)
    return _quantize_activation_torch(x, act_mode, input_scale, smooth_scale)


@quantize_activation_op.register_fake
def _(x, act_mode, input_scale, smooth_scale):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@quantize_activation_op.register_kernel("cuda")
def _(x, act_mode, input_scale, smooth_scale):
    check_act_args(x.shape[1], act_mode, input_scale, smooth_scale)
    if not _triton_enabled():
        return _quantize_activation_torch(x, act_mode, input_scale, smooth_scale)
    from w4a8_dint.kernels.triton_w4a8 import quantize_activation_triton

    return quantize_activation_triton(x, act_mode, input_scale, smooth_scale)


# -- op: w4a8_gemm -------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::w4a8_gemm", mutates_args=())
def w4a8_gemm_op(
    q_x: torch.Tensor, act_scale: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor,
    group_size: int, bias: Optional[torch.Tensor], out_dtype: torch.dtype, group_mult: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    check_gemm_args(q_x.shape[1], weight, half_scales, lut, group_size, bias, group_mult)
    return _w4a8_gemm_torch(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, group_mult)


@w4a8_gemm_op.register_fake
def _(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, group_mult=None):
    n, _ = check_gemm_args(q_x.shape[1], weight, half_scales, lut, group_size, bias, group_mult)
    return q_x.new_empty((q_x.shape[0], n), dtype=out_dtype)


@w4a8_gemm_op.register_kernel("cuda")
def _(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, group_mult=None):
    check_gemm_args(q_x.shape[1], weight, half_scales, lut, group_size, bias, group_mult)
    if not _triton_enabled():
        return _w4a8_gemm_torch(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, group_mult)
    from w4a8_dint.kernels.triton_w4a8 import w4a8_gemm_triton

    return w4a8_gemm_triton(q_x, act_scale, weight, half_scales, lut, group_size, bias, out_dtype, None, group_mult)


# -- op: w4a8_linear (the whole layer) -------------------------------------------------

def _check_linear_args(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias,
                       group_mult=None) -> int:
    if x.dim() < 1:
        raise FormatError("x must have a last (input feature) dimension")
    if x.dtype not in OUTPUT_DTYPES:
        raise FormatError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    k = x.shape[-1]
    check_act_args(k, act_mode, input_scale, smooth_scale)
    n, _ = check_gemm_args(k, weight, half_scales, lut, group_size, bias, group_mult)
    return n


@torch.library.custom_op(f"{NAMESPACE}::w4a8_linear", mutates_args=())
def w4a8_linear_op(
    x: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor, group_size: int,
    act_mode: str, input_scale: Optional[torch.Tensor], smooth_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    group_mult: Optional[torch.Tensor] = None, weight_absmax: Optional[int] = None,
) -> torch.Tensor:
    n = _check_linear_args(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias,
                           group_mult)
    x2 = x.reshape(-1, x.shape[-1])
    q_x, s_x = _quantize_activation_torch(x2, act_mode, input_scale, smooth_scale)
    y = _w4a8_gemm_torch(q_x, s_x, weight, half_scales, lut, group_size, bias, x.dtype, group_mult, weight_absmax)
    return y.reshape(*x.shape[:-1], n)


@w4a8_linear_op.register_fake
def _(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias, group_mult=None,
      weight_absmax=None):
    n = _check_linear_args(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias,
                           group_mult)
    return x.new_empty((*x.shape[:-1], n))


@w4a8_linear_op.register_kernel("cuda")
def _(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias, group_mult=None,
      weight_absmax=None):
    n = _check_linear_args(x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias,
                           group_mult)
    x2 = x.reshape(-1, x.shape[-1])
    if not _triton_enabled():
        q_x, s_x = _quantize_activation_torch(x2, act_mode, input_scale, smooth_scale)
        y = _w4a8_gemm_torch(q_x, s_x, weight, half_scales, lut, group_size, bias, x.dtype, group_mult)
    else:
        from w4a8_dint.kernels.triton_w4a8 import w4a8_linear_triton

        y = w4a8_linear_triton(x2, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias,
                               None, group_mult)
    return y.reshape(*x.shape[:-1], n)


# -- op: cpu_packed_gemm (kernels/cpu_packed.py) ----------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::cpu_packed_gemm", mutates_args=())
def cpu_packed_gemm_op(
    q_x: torch.Tensor, tiles: torch.Tensor, group_mult: Optional[torch.Tensor], comp: torch.Tensor, lut: torch.Tensor,
    half_scales: torch.Tensor,
) -> torch.Tensor:
    from w4a8_dint.kernels.cpu_packed import extension_ops, scratch_min_m

    ext = extension_ops()
    n = half_scales.shape[0]
    if q_x.shape[0] >= scratch_min_m() and cpu_int8_gemm_exact_full_range():
        # Prefill: decode to a per-call int8 scratch (freed on return) and run one oneDNN int8 GEMM.
        # Only where that GEMM is exact for |w8| up to 127 (VNNI/AMX); elsewhere the exact loop runs.
        w8 = ext.decode_int8(tiles, group_mult, comp, lut, n, q_x.shape[1])
        return torch._int_mm(q_x.contiguous(), w8.t()).float() * half_scales
    return ext.packed_gemm(q_x, tiles, group_mult, comp, lut, half_scales, n)


@cpu_packed_gemm_op.register_fake
def _(q_x, tiles, group_mult, comp, lut, half_scales):
    return q_x.new_empty((q_x.shape[0], half_scales.shape[0]), dtype=torch.float32)


def w4a8_linear(
    x: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor, group_size: int,
    act_mode: str = "per-token", input_scale: Optional[torch.Tensor] = None,
    smooth_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    group_mult: Optional[torch.Tensor] = None, weight_absmax: Optional[int] = None,
) -> torch.Tensor:
    """Keyword-friendly front door to ``torch.ops.w4a8_dint.w4a8_linear``."""
    return torch.ops.w4a8_dint.w4a8_linear(
        x, weight, half_scales, lut, group_size, act_mode, input_scale, smooth_scale, bias, group_mult, weight_absmax
    )
