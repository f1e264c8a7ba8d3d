"""Reference W4A8 linear in plain torch: the ground truth every kernel must match.

Math (all integer work exact, int32 accumulation):

    x_s      = x / smooth                       (optional per-input-channel pre-scale)
    q_x, s_x = int8 quantization of x_s          (per-token dynamic or per-tensor static)
    acc[g]   = sum_{k in group g} q_x[m, k] * w8[n, k]      int32, w8 = int8 expansion (2 * value)
    y[m, n]  = s_x[m] * sum_g acc[g][m, n] * (w_scale[n, g] / 2)  (+ bias)

The float epilogue is evaluated in float32 in exactly this order (groups summed
left to right), so a kernel that keeps the same order matches bit for bit.

Two-level weights (formats.py) fold the integer group multiplier into the int8
expansion (``w8 = 2v * m``) and keep one float scale per channel, so they are a
single group spanning K here: ONE integer GEMM per layer, per-channel epilogue.

Activation quantization lives here once; every kernel calls these functions
(the traceable variants exist for compiled graphs and tensor parallelism).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .formats import FormatError, QuantizedWeight, check_finite

ActMode = Literal["per-token", "per-tensor"]
ACT_MODES: tuple[str, ...] = ("per-token", "per-tensor")
INT8_MAX = 127


def act_scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 scale; an all-zero row gets scale 1 so it quantizes to zeros, not NaN."""
    s = absmax.float() / INT8_MAX
    return torch.where(s > 0, s, torch.ones_like(s))


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """``[M, 1]`` float32 max|x| per row: what a tensor-parallel shard reduces before quantizing."""
    return x.float().abs().amax(dim=-1, keepdim=True)


def quantize_activation_per_token(
    x: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(q int8 [M, K], scale float32 [M, 1])``, scale = max|x_row| / 127.

    ``absmax [M, 1]`` may be given precomputed (e.g. reduced over the tensor-parallel shards of
    the row), so a shard quantizes with the whole row's scale.
    """
    xf = x.float()
    scale = act_scale_from_absmax(row_absmax(xf) if absmax is None else absmax)
    q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static INT8 without the value check, so torch.compile can trace it (no data-dependent ``if``).

    Callers check the scale once (at load, or :func:`quantize_activation_per_tensor`).
    """
    xf = x.float()
    s = scale.to(device=xf.device, dtype=torch.float32).reshape(1, 1)
    q = torch.round(xf / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s.expand(xf.shape[0], 1)


def quantize_activation_per_tensor(x: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Static INT8 with a calibrated scale; values beyond the calibrated range saturate."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1, 1)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise FormatError(f"static activation scale must be finite and > 0, got {s.flatten().tolist()}")
    return quantize_activation_static(x, s)


def quantize_activation(
    x: torch.Tensor, act_mode: str, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if act_mode == "per-token":
        return quantize_activation_per_token(x)
    if act_mode == "per-tensor":
        if input_scale is None:
            raise FormatError("per-tensor activation mode needs a calibrated input_scale")
        return quantize_activation_per_tensor(x, input_scale)
    raise FormatError(f"unknown activation mode {act_mode!r}; expected one of {ACT_MODES}")


def fake_quantize_activation(x: torch.Tensor, act_mode: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations (any leading dims); what calibration losses see."""
    shape = x.shape
    q, s = quantize_activation(x.reshape(-1, shape[-1]), act_mode, input_scale)
    return (q.float() * s).reshape(shape).to(x.dtype)


def int_matmul_grouped(
    q_x: torch.Tensor, w8: torch.Tensor, group_size: int, weight_absmax: int | None = None
) -> torch.Tensor:
    """Exact int32 per-group partial sums ``[G, M, N]`` of ``q_x [M, K] @ w8[N, K].T``.

    ``weight_absmax``: ``max |w8|`` when the caller knows it (kernels compute it once at load); see :func:`_int_mm`."""
    m, k = q_x.shape
    n = w8.shape[0]
    if w8.shape[1] != k:
        raise FormatError(f"activation K={k} does not match weight K={w8.shape[1]}")
    groups = k // group_size
    out = torch.empty(groups, m, n, dtype=torch.int32, device=q_x.device)
    for g in range(groups):
        sl = slice(g * group_size, (g + 1) * group_size)
        out[g] = _int_mm(q_x[:, sl], w8[:, sl], weight_absmax)
    return out


# Largest |weight| an int8 GEMM stays exact for on x86 CPUs without VNNI (AVX2, AVX512 without VNNI):
# there oneDNN multiplies (s8 source + 128) as u8 by the s8 weight and adds pairs into a SATURATING
# int16 (vpmaddubsw), so 2 * 255 * |w| must stay <= 32767. The float-scale expansions (|2v| <= 14)
# are far below it; two-level expansions (|2v * m| up to 127) are not.
SATURATION_SAFE_WEIGHT = 64


@functools.cache
def cpu_int8_gemm_exact_full_range() -> bool:
    """Whether ``torch._int_mm`` on CPU is exact for any int8 operands here (VNNI/AMX: yes; AVX2: no).

    Probed once per process with operands that saturate an int16 pair sum, so it follows the CPU
    and any ``ONEDNN_MAX_CPU_ISA`` cap alike."""
    a = torch.tensor([[127] * 32, [-127] * 32, [127, -127] * 16, [0] * 32], dtype=torch.int8)
    b = torch.tensor([[127] * 32, [-127] * 32, [-127, 127] * 16, [127] * 32], dtype=torch.int8)
    try:
        got = torch._int_mm(a, b.t().contiguous())
    except RuntimeError:
        return False
    return torch.equal(got.long(), (a.long() @ b.long().t()))


def _int_mm(a: torch.Tensor, b_nk: torch.Tensor, weight_absmax: int | None = None) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K] -> int32 [M, N], exact on every CPU.

    Where the CPU's int8 GEMM saturates (see SATURATION_SAFE_WEIGHT), a weight beyond the safe range is
    split into two halves within it (floor(w/2) + ceil(w/2)) and the two exact int32 results added.
    ``weight_absmax`` (``max |b_nk|``, or an upper bound of it) lets a kernel decide that once at load
    instead of reducing the weight on every call; None (the reference) measures it here."""
    if a.shape[0] == 0:
        return torch.zeros(0, b_nk.shape[0], dtype=torch.int32, device=a.device)
    if (b_nk.device.type == "cpu" and b_nk.numel() and not cpu_int8_gemm_exact_full_range()
            and (int(b_nk.abs().amax()) if weight_absmax is None else weight_absmax) > SATURATION_SAFE_WEIGHT):
        low = torch.div(b_nk, 2, rounding_mode="floor")
        return _int_mm_raw(a, low) + _int_mm_raw(a, b_nk - low)
    return _int_mm_raw(a, b_nk)


def _int_mm_raw(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    try:
        return torch._int_mm(a.contiguous(), b_nk.t().contiguous())
    except RuntimeError:
        # Shapes some backends reject: float64 is still exact (|sum| < 2**53).
        return (a.double() @ b_nk.double().t()).to(torch.int32)


def w4a8_epilogue(acc: torch.Tensor, half_scales: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """``acc [G, M, N]`` int32, ``half_scales [N, G]``, ``act_scale [M, 1]`` -> float32 ``[M, N]``."""
    y = acc[0].float() * half_scales[:, 0]
    for g in range(1, acc.shape[0]):
        y = y + acc[g].float() * half_scales[:, g]
    return y * act_scale


def w4a8_linear_reference(
    x: torch.Tensor,
    weight: QuantizedWeight,
    act_mode: str = "per-token",
    input_scale: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; see the module docstring for the exact math."""
    check_finite(x, "activation")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if smooth_scale is not None:
        x2 = x2 / smooth_scale.float()
    q_x, s_x = quantize_activation(x2, act_mode, input_scale)
    w8, half_scales = weight.int8_expansion()
    acc = int_matmul_grouped(q_x, w8, weight.epilogue_group_size)
    y = w4a8_epilogue(acc, half_scales.float(), s_x)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
