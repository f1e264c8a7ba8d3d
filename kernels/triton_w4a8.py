"""Triton W4A8 kernels: INT8 activation quantization and a packed 4-bit x INT8 GEMM.

Both are bit-identical to ``w4a8_dint.reference`` (tested under ``TRITON_INTERPRET=1``):

* ``_act_quant_kernel``: one program per row. ``x / smooth`` (optional), per-token
  ``absmax / 127`` (an all-zero row gets scale 1) or a given per-tensor scale, then
  round-half-even and clamp to +-127. Divisions use ``div_rn`` (IEEE, like torch) rather
  than Triton's default approximate fp32 division.
* ``_w4a8_gemm_kernel``: tiles ``BLOCK_M x BLOCK_N``, walks K in ``BLOCK_K`` steps. Each
  step loads packed bytes ``uint8 [N, K/2]``, picks the nibble of each column (low =
  even column), decodes it to int8 (2 * value) through the format's 16-entry table
  *passed as a tensor* (never typed here), and runs ``tl.dot(int8, int8) -> int32``.
  Per channel, the int32 accumulator covers all of K and is scaled once. Group-wise,
  ``BLOCK_K`` divides the group, so a group's partial sum stays int32 and leaves integer
  math once per group: ``y += float(acc_g) * half_scale[n, g]``, groups left to right,
  exactly the reference's float order; FMA contraction is switched off at launch
  (``enable_fp_fusion=False``) so ``y + a * b`` rounds twice like the torch reference.
* Two-level weights (``group_mult`` given; formats.py): the decoded int8 is multiplied by the
  group's integer multiplier ``m[n, k // G]`` in registers (``|2v| * m <= 127`` stays int8), and
  the layer is a per-channel GEMM: one int32 accumulator over all of K, one float multiply by
  ``s / 2`` at the end, no per-group float accumulation. ``BLOCK_K`` divides ``G``, so each
  K-block reads one multiplier per output column.
* Split-K (small M, few output tiles): programs along grid axis 1 take disjoint K
  ranges and write int32 partials ``[P, M, N]`` (per channel: one slot per split, summed
  as integers; group-wise: one slot per group), then ``_splitk_epilogue_kernel`` applies
  the same float epilogue. No atomics, so results are deterministic and still exact.

Table decode (``DECODE``): ``0`` (default) gathers ``lut[code]`` from the 16-byte table
(L1-resident); ``1`` keeps the table in four int32 registers (the same tensor viewed as
int32) and selects the byte with compares and shifts. Both are tested; compiled for sm_90
the gather needs fewer instructions per K-block (docs/kernels.md); which is faster is for
a GPU to say (``benchmarks/kernel_bench.py`` times both).

Launch wrappers accept CUDA tensors, or CPU tensors when the process runs the Triton
interpreter (``TRITON_INTERPRET=1`` must be set before ``import triton``).
Block sizes come from :func:`heuristic_config` (deterministic, no benchmarking, so safe
inside CUDA-graph capture) unless ``W4A8_DINT_AUTOTUNE=1``, which autotunes over
:data:`AUTOTUNE_CONFIGS` keyed by the M bucket (1, 2, 4, ... 4096).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from w4a8_dint.formats import FormatError
from w4a8_dint.reference import ACT_MODES

# triton.jit picks the interpreter when this module is imported; remember which one we got.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
DOT_MIN_K = 16  # tl.dot needs every dimension >= 16
BLOCK_K_CHOICES = (128, 64, 32, 16)


# -- kernels -------------------------------------------------------------------------------

@triton.jit
def _round_half_even_clamped(v):
    """``torch.round(v).clamp(-127, 127)``. Adding and subtracting 1.5 * 2**23 rounds a float32
    |v| < 2**22 to an integer, half to even (libdevice.rint does not exist in the interpreter)."""
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)  # integer bounds: clamp-then-round == round-then-clamp
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _act_quant_kernel(
    x_ptr, smooth_ptr, in_scale_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if PER_TOKEN:
        absmax = tl.zeros((), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32))
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=0))
        scale = tl.math.div_rn(absmax, 127.0)
        scale = tl.where(scale > 0, scale, 1.0)
    else:
        scale = tl.load(in_scale_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32))
        q = _round_half_even_clamped(tl.math.div_rn(x, scale))
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _decode_codes(codes, lut_ptr, lut_w0, lut_w1, lut_w2, lut_w3, DECODE: tl.constexpr):
    """4-bit codes (int, 0..15) -> int8 ``2 * value`` through the format's table."""
    idx = codes.to(tl.int32)
    if DECODE == 0:
        val = tl.load(lut_ptr + idx)
    else:
        word = tl.where(idx < 8, tl.where(idx < 4, lut_w0, lut_w1), tl.where(idx < 12, lut_w2, lut_w3))
        # Move byte (idx % 4) of the little-endian word to the top, arithmetic-shift back: sign-extended int8.
        val = ((word << (24 - (idx & 3) * 8)) >> 24).to(tl.int8)
    return val


@triton.jit
def _dot_block(
    acc, a_ptrs, w_ptrs, k0, K, mask_m, mask_n, lut_ptr, lut_w0, lut_w1, lut_w2, lut_w3, mult_ptrs,
    PACKED: tl.constexpr, DECODE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
    TWO_LEVEL: tl.constexpr, MULT_GROUP: tl.constexpr,
):
    """``acc += q_x[:, k0:k0+BLOCK_K] @ w8[k0:k0+BLOCK_K, :]`` in int32.

    Packed weights: element ``[k, n]`` of the tile reads byte ``[n, k // 2]`` and keeps the nibble
    of its column parity (low = even). Each byte is read twice (the second read hits L1).
    Reading the bytes once and interleaving the nibbles (``tl.join`` + ``reshape``), or splitting
    the dot into even / odd columns, were compiled for sm_90 too: more registers, no fewer
    instructions per K-block, so the simple form stays (docs/kernels.md, "decode").
    """
    offs_k = tl.arange(0, BLOCK_K)
    if EVEN_K:
        a_mask = mask_m[:, None]
        w_mask = mask_n[None, :]
    else:
        k_ok = (k0 + offs_k) < K
        a_mask = mask_m[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & mask_n[None, :]
    a = tl.load(a_ptrs + k0, mask=a_mask, other=0)
    if PACKED:
        packed = tl.load(w_ptrs + k0 // 2, mask=w_mask, other=0)
        codes = (packed >> ((offs_k[:, None] % 2) * 4)) & 0xF
        b = _decode_codes(codes, lut_ptr, lut_w0, lut_w1, lut_w2, lut_w3, DECODE)
        if TWO_LEVEL:
            # BLOCK_K divides the multiplier group: one m per output column in this block; |2v| * m <= 127.
            mult = tl.load(mult_ptrs + k0 // MULT_GROUP, mask=mask_n, other=0)
            b = (b.to(tl.int32) * mult.to(tl.int32)[None, :]).to(tl.int8)
    else:
        b = tl.load(w_ptrs + k0, mask=w_mask, other=0)
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _cast_output(y, out_ty: tl.constexpr):
    """float32 -> output dtype, round to nearest even (torch's rounding)."""
    if out_ty == tl.bfloat16:
        # Explicit RNE on the bits: the interpreter's default fp32->bf16 cast truncates, the GPU's rounds;
        # this is what torch does and gives the same bits everywhere (inputs are finite).
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(out_ty)
    return out


@triton.jit
def _scale_bias_store(
    y, offs_m, offs_n, mask_m, mask_n, a_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr,
):
    """Reference epilogue tail: ``y * act_scale`` (+ bias), cast to the output dtype, store."""
    s_x = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=1.0)
    y = y * s_x[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, _cast_output(y, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w4a8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, hs_ptr, lut_ptr, lut_words_ptr, mult_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K,
    stride_am, stride_wn, stride_hn, stride_mn, stride_om,
    M_BUCKET,  # only an autotune key (M rounded up to a power of two)
    GROUPED: tl.constexpr, GROUP_SIZE: tl.constexpr, PACKED: tl.constexpr, DECODE: tl.constexpr,
    TWO_LEVEL: tl.constexpr, MULT_GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Swizzled tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_band = GROUP_M * num_pid_n
    first_m = (pid // pids_per_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    if PACKED:  # tile element [k, n] reads byte [n, k // 2] (see _dot_block)
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] // 2
    else:
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    if DECODE == 1:
        lut_w0 = tl.load(lut_words_ptr + 0)
        lut_w1 = tl.load(lut_words_ptr + 1)
        lut_w2 = tl.load(lut_words_ptr + 2)
        lut_w3 = tl.load(lut_words_ptr + 3)
    else:
        lut_w0 = 0
        lut_w1 = 0
        lut_w2 = 0
        lut_w3 = 0
    mult_ptrs = mult_ptr + offs_n.to(tl.int64) * stride_mn  # two-level multipliers of this column tile
    # Split-K partials: int32 [P, M, N], one slot per group (grouped) or per split (per channel).
    part_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]

    # One flat loop over this program's K blocks (so Triton can software-pipeline the loads).
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    if GROUPED:
        steps_per_group: tl.constexpr = GROUP_SIZE // BLOCK_K
        num_groups = K // GROUP_SIZE
        groups_per_split = tl.cdiv(num_groups, SPLIT_K)
        kb_start = pid_k * groups_per_split * steps_per_group
        kb_end = tl.minimum((pid_k + 1) * groups_per_split, num_groups) * steps_per_group
    else:
        blocks_per_split = tl.cdiv(num_k_blocks, SPLIT_K)
        kb_start = pid_k * blocks_per_split
        kb_end = tl.minimum(kb_start + blocks_per_split, num_k_blocks)

    # -0.0 is the exact identity of float addition, so y = -0 + p0 + p1 ... has the reference's bits.
    y = tl.full((BLOCK_M, BLOCK_N), -0.0, dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(kb_start, kb_end):
        acc = _dot_block(acc, a_ptrs, w_ptrs, kb * BLOCK_K, K, mask_m, mask_n,
                         lut_ptr, lut_w0, lut_w1, lut_w2, lut_w3, mult_ptrs, PACKED, DECODE, EVEN_K, BLOCK_K,
                         TWO_LEVEL, MULT_GROUP)
        if GROUPED:
            # A group ends every steps_per_group blocks: leave integer math once per group.
            if (kb + 1) % steps_per_group == 0:
                g = kb // steps_per_group
                if SPLIT_K == 1:
                    hs = tl.load(hs_ptr + offs_n * stride_hn + g, mask=mask_n, other=0.0)
                    y = y + acc.to(tl.float32) * hs[None, :]
                else:
                    tl.store(part_ptrs + g * M * N, acc, mask=out_mask)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    if GROUPED:
        if SPLIT_K == 1:
            _scale_bias_store(y, offs_m, offs_n, mask_m, mask_n, a_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)
    else:
        if SPLIT_K == 1:
            hs = tl.load(hs_ptr + offs_n * stride_hn, mask=mask_n, other=0.0)
            y = y + acc.to(tl.float32) * hs[None, :]
            _scale_bias_store(y, offs_m, offs_n, mask_m, mask_n, a_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)
        else:
            tl.store(part_ptrs + pid_k * M * N, acc, mask=out_mask)


@triton.jit
def _splitk_epilogue_kernel(
    part_ptr, a_scale_ptr, hs_ptr, bias_ptr, out_ptr,
    M, N, P, stride_hn, stride_om,
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Reduce int32 partials ``[P, M, N]``: integer sum (per channel) or ordered float sum over groups."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    part_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    y = tl.full((BLOCK_M, BLOCK_N), -0.0, dtype=tl.float32)
    if GROUPED:
        for p in range(0, P):
            acc = tl.load(part_ptrs + p * M * N, mask=mask, other=0)
            hs = tl.load(hs_ptr + offs_n * stride_hn + p, mask=mask_n, other=0.0)
            y = y + acc.to(tl.float32) * hs[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for p in range(0, P):
            acc += tl.load(part_ptrs + p * M * N, mask=mask, other=0)
        hs = tl.load(hs_ptr + offs_n * stride_hn, mask=mask_n, other=0.0)
        y = y + acc.to(tl.float32) * hs[None, :]
    _scale_bias_store(y, offs_m, offs_n, mask_m, mask_n, a_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


# -- configs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of the GEMM; ``split_k > 1`` adds the int32-partials reduction pass."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    decode: int = 0  # 0: gather lut[code] (L1-resident); 1: table bytes in registers, selected by compares
    group_m: int = 8


def block_k_for(k: int, group_size: int, preferred: int = 128) -> Optional[int]:
    """Largest BLOCK_K <= preferred that never straddles a group (grouped) and is >= 16; None if impossible."""
    grouped = group_size < k
    for bk in BLOCK_K_CHOICES:
        if bk > preferred:
            continue
        if grouped and group_size % bk:
            continue
        if not grouped and bk > max(DOT_MIN_K, triton.next_power_of_2(k)):
            continue
        return bk
    return None


def unsupported_reason(k: int, group_size: int) -> Optional[str]:
    """Why the Triton GEMM cannot run this layer shape, or None."""
    g = k if group_size == -1 else group_size
    if k % 2:
        return f"K={k} is odd; packed 4-bit weights need an even K"
    if g <= 0 or k % g:
        return f"group size {group_size} does not divide K={k}"
    if block_k_for(k, g) is None:
        return f"group size {g} is not a multiple of {DOT_MIN_K} (tl.dot needs BLOCK_K >= 16 inside one group)"
    return None


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: Optional[torch.device]) -> int:
    if device is None or device.type != "cuda":
        return 8  # interpreter: pretend a small GPU so split-K paths are exercised in tests
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_split_k(m: int, n: int, k: int, group_size: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K only when the output tiles cannot fill the GPU, and never so far that partials cost more than weights.

    Per channel the partials are ``split x M x N`` int32 (negligible); group-wise they are one int32 per group
    per output (``G x M x N``), which stays below the packed weight's ``N x K / 2`` bytes only while
    ``M < group_size / 8``; we require ``M <= group_size / 16``.
    """
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if tiles >= sms:
        return 1
    grouped = group_size < k
    if grouped:
        if 16 * m > group_size:
            return 1
        units = k // group_size
    else:
        units = triton.cdiv(k, block_k) // 4  # keep >= 4 K-blocks per split so each program pipelines
    split = min(triton.cdiv(sms, tiles), units, 16)
    return 1 << (max(split, 1).bit_length() - 1)  # power of two


# M bucket upper bound -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen so that no config spills
# registers when compiled for sm_90 (kernels/triton_aot.py; tests/kernels/test_triton_compile.py);
# not yet timed on a GPU. Group-wise tiles carry two accumulators (int32 group partial + float32 sum).
HEURISTIC_TILES: dict[int, tuple[int, int, int, int]] = {
    16: (16, 64, 4, 4),
    32: (32, 64, 8, 4),
    64: (32, 128, 8, 4),
    256: (64, 128, 8, 3),
    1 << 62: (64, 256, 8, 3),
}


def heuristic_config(
    m: int, n: int, k: int, group_size: int, device: Optional[torch.device], sms: Optional[int] = None,
    packed: bool = True, two_level: bool = False,
) -> GemmConfig:
    """Deterministic launch parameters by M bucket (no benchmarking: safe inside CUDA-graph capture).

    Untuned starting points; ``W4A8_DINT_AUTOTUNE=1`` replaces them with measured ones. Unpacked
    int8 weights use BLOCK_K 64 (at 128 their tile spills registers on sm_90).
    """
    g = k if group_size == -1 else group_size
    bk = block_k_for(k, g, preferred=64 if m > 256 or not packed else 128)
    if bk is None:
        raise FormatError(unsupported_reason(k, group_size) or "unsupported shape")
    bm, bn, warps, stages = next(t for bound, t in HEURISTIC_TILES.items() if m <= bound)
    # Two-level: BLOCK_K divides the multiplier group (above), but the epilogue is per channel (split like it).
    split = choose_split_k(m, n, k, k if two_level else g, bm, bn, bk, sms if sms is not None else _device_sms(device))
    return GemmConfig(bm, bn, bk, split, warps, stages)


AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, w in ((16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4),
                      (128, 128, 8), (128, 256, 8), (64, 256, 8))
    for bk in (64, 128)
    for s in (3, 4)
]


def _prune_configs(configs, named_args, **kwargs):
    m_bucket = named_args["M_BUCKET"]
    grouped, gsize = kwargs["GROUPED"], kwargs["GROUP_SIZE"]
    if kwargs.get("TWO_LEVEL", False):
        grouped, gsize = True, kwargs["MULT_GROUP"]  # BLOCK_K must divide the multiplier group
    keep = [
        c for c in configs
        if (not grouped or gsize % c.kwargs["BLOCK_K"] == 0)
        and c.kwargs["BLOCK_M"] <= max(16, m_bucket)
        and c.kwargs["BLOCK_M"] >= min(64, m_bucket // 8)  # big M: no tiny tiles
    ]
    return keep or [c for c in configs if not grouped or gsize % c.kwargs["BLOCK_K"] == 0][:1]


_w4a8_gemm_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["M_BUCKET", "N", "K", "GROUPED", "GROUP_SIZE", "PACKED", "SPLIT_K", "TWO_LEVEL", "MULT_GROUP"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_w4a8_gemm_kernel)


def autotune_enabled() -> bool:
    return os.environ.get("W4A8_DINT_AUTOTUNE", "0") == "1" and not INTERPRETED


# -- launch wrappers -----------------------------------------------------------------------

def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" and not INTERPRETED:
            continue
        if t.device.type == "cpu" and INTERPRETED:
            continue
        raise FormatError(
            f"Triton W4A8 kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before importing "
            f"triton); got a {t.device.type} tensor with the interpreter {'on' if INTERPRETED else 'off'}"
        )


def quantize_activation_triton(
    x: torch.Tensor, act_mode: str, input_scale: Optional[torch.Tensor] = None,
    smooth_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(q int8 [M, K], scale float32 [M, 1])``, equal to ``reference.quantize_activation``."""
    if act_mode not in ACT_MODES:
        raise FormatError(f"unknown activation mode {act_mode!r}; expected one of {ACT_MODES}")
    per_token = act_mode == "per-token"
    if not per_token and input_scale is None:
        raise FormatError("per-tensor activation mode needs a calibrated input_scale")
    _check_device(x, input_scale, smooth_scale)
    if x.dim() != 2:
        raise FormatError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    smooth = smooth_scale.contiguous() if smooth_scale is not None else x
    in_scale = input_scale.reshape(1).float() if not per_token else scale
    block_k = min(triton.next_power_of_2(k), 4096)
    _act_quant_kernel[(m,)](
        x, smooth, in_scale, q, scale, k, x.stride(0), q.stride(0),
        HAS_SMOOTH=smooth_scale is not None, PER_TOKEN=per_token, BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8,
    )
    return q, scale


def w4a8_gemm_triton(
    q_x: torch.Tensor, act_scale: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor,
    group_size: int, bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float16,
    config: Optional[GemmConfig] = None, group_mult: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``q_x int8 [M, K]`` x weight (packed ``uint8 [N, K/2]`` or int8 ``[N, K]``) -> ``out_dtype [M, N]``.

    Equal to ``reference.w4a8_epilogue(int_matmul_grouped(...))`` (+ bias) bit for bit.
    ``config`` overrides the heuristic / autotuned launch parameters (tests, benchmarks).
    Two-level weights: ``group_mult uint8 [N, K // group_size]`` (unpacked multipliers), packed codes,
    ``half_scales [N, 1]`` = ``s / 2``; one per-channel GEMM.
    """
    _check_device(q_x, act_scale, weight, half_scales, lut, bias, group_mult)
    if q_x.dtype != torch.int8 or q_x.dim() != 2:
        raise FormatError(f"q_x must be int8 [M, K], got {q_x.dtype} {tuple(q_x.shape)}")
    m, k = q_x.shape
    packed = weight.dtype == torch.uint8
    n = weight.shape[0]
    wk = weight.shape[1] * (2 if packed else 1)
    if weight.dtype not in (torch.uint8, torch.int8) or wk != k:
        raise FormatError(f"weight must be uint8 [N, K/2] or int8 [N, K] with K={k}, got {weight.dtype} {tuple(weight.shape)}")
    g = k if group_size == -1 else group_size
    why = unsupported_reason(k, g)
    if why:
        raise FormatError(why)
    two_level = group_mult is not None
    if two_level and not packed:
        raise FormatError("two-level weights are decoded from packed codes: pass uint8 [N, K/2] with group_mult")
    if two_level and (group_mult.dtype != torch.uint8 or tuple(group_mult.shape) != (n, k // g)):
        raise FormatError(f"group_mult must be uint8 [N, K // G] = {(n, k // g)}, got "
                          f"{group_mult.dtype} {tuple(group_mult.shape)}")
    grouped = g < k and not two_level
    scale_shape = (n, 1) if two_level else (n, k // g)
    if tuple(half_scales.shape) != scale_shape:
        raise FormatError(f"half_scales must be {'[N, 1]' if two_level else '[N, K // G]'} = {scale_shape}, "
                          f"got {tuple(half_scales.shape)}")

    q_x = q_x if q_x.stride(-1) == 1 else q_x.contiguous()
    weight = weight.contiguous()
    half_scales = half_scales.float().contiguous()
    act_scale = act_scale.float().contiguous()
    lut = lut.to(torch.int8).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=q_x.device)
    if m == 0 or n == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else out
    # The autotune configs use BLOCK_K 64 / 128; smaller groups keep the heuristic.
    use_autotune = config is None and autotune_enabled() and (not (grouped or two_level) or g % 64 == 0)
    if config is None:
        config = heuristic_config(m, n, k, g, q_x.device, packed=packed, two_level=two_level)
    if (grouped or two_level) and g % config.block_k:
        raise FormatError(f"BLOCK_K={config.block_k} must divide the group size {g}")
    split = config.split_k
    num_slots = (k // g) if grouped else split
    part = torch.empty((num_slots, m, n), dtype=torch.int32, device=q_x.device) if split > 1 else out
    mult = group_mult.contiguous() if two_level else lut  # any valid pointer when unused
    args = (q_x, act_scale, weight, half_scales, lut, lut.view(torch.int32), mult, bias_arg, out, part,
            m, n, k, q_x.stride(0), weight.stride(0), half_scales.stride(0), mult.stride(0) if two_level else 0,
            out.stride(0), min(triton.next_power_of_2(m), 4096))
    common = dict(GROUPED=grouped, GROUP_SIZE=g if grouped else 1, PACKED=packed, DECODE=config.decode,
                  TWO_LEVEL=two_level, MULT_GROUP=g if two_level else 1,
                  SPLIT_K=split, HAS_BIAS=bias is not None, GROUP_M=config.group_m)
    if use_autotune:
        even_k = all(k % bk == 0 for bk in (64, 128))
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _w4a8_gemm_autotuned[grid](*args, **common, EVEN_K=even_k, enable_fp_fusion=False)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split)
        _w4a8_gemm_kernel[grid](
            *args, **common, EVEN_K=k % config.block_k == 0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False,
        )
    if split > 1:
        bm, bn = 16 if m <= 16 else 64, 128
        _splitk_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            part, act_scale, half_scales, bias_arg, out, m, n, num_slots, half_scales.stride(0), out.stride(0),
            GROUPED=grouped, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=4, enable_fp_fusion=False,
        )
    return out


def w4a8_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, half_scales: torch.Tensor, lut: torch.Tensor, group_size: int,
    act_mode: str = "per-token", input_scale: Optional[torch.Tensor] = None,
    smooth_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    config: Optional[GemmConfig] = None, group_mult: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]`` in ``x.dtype``: the two kernels back to back."""
    q_x, s_x = quantize_activation_triton(x, act_mode, input_scale, smooth_scale)
    return w4a8_gemm_triton(q_x, s_x, weight, half_scales, lut, group_size, bias, x.dtype, config, group_mult)
