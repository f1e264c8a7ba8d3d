"""The 4-bit weight formats, defined once.

Every format is a table of 16 code points. Values are stored in *half steps*
(``half_values[c] = 2 * value(c)``) so that every value times two is a small
integer that fits int8. That is the "int8 expansion" the kernels, the reference
matmul and the hardware model all use: a weight code ``c`` with scale ``s``
means ``value(c) * s == half_values[c] * (s / 2)``.

Tensor layout (shared by calibrate, kernels, both integrations):

* weight ``W`` is ``[N, K]`` (out_features, in_features), as ``nn.Linear``;
* codes are packed two per byte into ``uint8 [N, K // 2]``: byte ``j`` holds
  the code of column ``2j`` in its low nibble and column ``2j + 1`` in its
  high nibble;
* scales are ``float32 [N, K // G]`` for group size ``G`` (``G = -1`` means one
  group spanning K, i.e. per output channel, shape ``[N, 1]``).

Two scale schemes (``SCALE_SCHEMES``):

* ``"float"``: one float scale per group, as above.
* ``"two-level"``: ``weight = value(c) * m[n, g] * s[n]`` with a small unsigned
  integer multiplier ``m`` per group (``0 <= m <= max_group_mult(table)``, so that
  ``|2v| * m <= 127``) and one float scale ``s`` per output channel (``[N, 1]``).
  The int8 expansion is then ``2v * m`` and the layer is ONE per-channel integer
  GEMM with scale ``s / 2`` (QServe's progressive group scales / "Integer Scale").
  Multipliers are packed 4 bits per group, two per byte like the codes:
  ``uint8 [N, ceil(G_count / 2)]``, group ``2j`` in the low nibble, and when
  the group count is odd the last high nibble is 0.

Rounding is to the nearest table value; an exact tie goes to the value of
smaller magnitude (toward zero). That is symmetric for symmetric tables and
never rounds a tiny weight *away* from zero.

This module is pure torch and imports nothing else of the project.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import cached_property

import torch

NUM_CODES = 16
PER_CHANNEL = -1  # group size meaning "one group spanning the whole input dim"
INT8_MAX = 127
MULT_MAX_4BIT = 15  # group multipliers are stored in a nibble

FLOAT_SCALES = "float"
TWO_LEVEL = "two-level"
SCALE_SCHEMES: tuple[str, ...] = (FLOAT_SCALES, TWO_LEVEL)


class FormatError(ValueError):
    """Bad input to a format operation (shape, group size, non-finite values)."""


@dataclass(frozen=True)
class CodeTable:
    """A 4-bit format: 16 code points, each ``half_values[c] / 2`` in units of the scale.

    ``unused_codes`` are code points the format does not use (for instance the
    ``-8`` of symmetric int4). They decode to a value that is also reachable
    otherwise, and rounding never produces them.
    """

    name: str
    half_values: tuple[int, ...]
    unused_codes: tuple[int, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.half_values) != NUM_CODES:
            raise FormatError(f"{self.name}: needs {NUM_CODES} code points, got {len(self.half_values)}")
        if any(not -128 <= v <= 127 for v in self.half_values):
            raise FormatError(f"{self.name}: half values must fit int8")
        used = [v for c, v in enumerate(self.half_values) if c not in self.unused_codes]
        if len(set(used)) != len(used):
            raise FormatError(f"{self.name}: used code points must have distinct values")

    # -- derived views ------------------------------------------------------
    @property
    def values(self) -> tuple[float, ...]:
        """Value of each code in units of the scale (what goes into quantization_config)."""
        return tuple(v / 2 for v in self.half_values)

    @property
    def used_codes(self) -> tuple[int, ...]:
        return tuple(c for c in range(NUM_CODES) if c not in self.unused_codes)

    @property
    def max_positive(self) -> float:
        return max(self.values[c] for c in self.used_codes)

    @property
    def max_negative(self) -> float:
        """Largest magnitude on the negative side (a positive number)."""
        return -min(self.values[c] for c in self.used_codes)

    @property
    def has_zero(self) -> bool:
        return any(self.half_values[c] == 0 for c in self.used_codes)

    @cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = sorted(self.used_codes, key=lambda c: self.half_values[c])
        vals = torch.tensor([self.half_values[c] / 2 for c in codes], dtype=torch.float32)
        mids = (vals[1:] + vals[:-1]) / 2
        return vals, torch.tensor(codes, dtype=torch.uint8), mids

    def expansion_lut(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int8 ``[16]``: code -> 2 * value. Index with unpacked codes to get the int8 expansion."""
        return torch.tensor(self.half_values, dtype=torch.int8, device=device)

    def value_lut(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 ``[16]``: code -> value."""
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    def to_config(self) -> dict:
        return {"name": self.name, "values": list(self.values)}


def _int4_symmetric() -> CodeTable:
    # Two's-complement nibble: code c < 8 is +c, code c >= 8 is c - 16; -8 is unused.
    half = tuple(2 * (c if c < 8 else c - 16) for c in range(16))
    half = tuple(0 if v == -16 else v for v in half)  # code 8 (-8) unused, decodes to 0
    return CodeTable("int4", half, unused_codes=(8,), description="symmetric INT4, -7..7 (code 8 unused)")


def _fp4_e2m1() -> CodeTable:
    # OCP E2M1: sign bit 3, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}; code 8 is -0 (unused).
    mags_half = (0, 1, 2, 3, 4, 6, 8, 12)
    half = tuple(mags_half[c] if c < 8 else -mags_half[c - 8] for c in range(16))
    return CodeTable("fp4", half, unused_codes=(8,), description="FP4 E2M1 (OCP), code 8 (-0) unused")


def _signed_table(name: str, positives: list[int], negatives: list[int], zero: bool, description: str) -> CodeTable:
    """Build a table from half-value magnitudes; codes 0..7 carry zero/positives, 8..15 negatives."""
    pos = ([0] if zero else []) + positives
    neg = [-v for v in negatives]
    if len(pos) > 8 or len(neg) > 8:
        raise FormatError(f"{name}: at most 8 codes per sign half")
    unused: list[int] = []
    low = pos + [0] * (8 - len(pos))
    unused += list(range(len(pos), 8))
    high = neg + [0] * (8 - len(neg))
    unused += list(range(8 + len(neg), 16))
    return CodeTable(name, tuple(low + high), unused_codes=tuple(unused), description=description)


# dINT4 candidates. The paper's exact table was not published in anything we could
# read (shared/notes/papers.md §1.5), so the variants are named and the default
# is chosen by the accuracy study. All keep the "denormal" ±1/2 step near zero.
_DINT4_A = CodeTable(
    "dint4-a",
    # codes 0..8: 0, +1/2, +1..+7; codes 9..15: -1/2, -1..-6 (all 16 used)
    (0, 1, 2, 4, 6, 8, 10, 12, 14, -1, -2, -4, -6, -8, -10, -12),
    description="dINT4 {0, ±1/2, ±1..±6, +7}: int4 with -7 traded for the two half-step denormals",
)
_DINT4_B = _signed_table(
    "dint4-b", [1, 2, 4, 6, 8, 10, 12, 14], [1, 2, 4, 6, 8, 10, 12, 14], zero=False,
    description="dINT4 {±1/2, ±1..±7}: no zero code",
)
_DINT4_C = _signed_table(
    "dint4-c", [1, 2, 4, 6, 8, 10, 12], [1, 2, 4, 6, 8, 10, 12], zero=True,
    description="dINT4 {0, ±1/2, ±1..±6}: symmetric, one code unused",
)

FORMATS: dict[str, CodeTable] = {t.name: t for t in (_int4_symmetric(), _fp4_e2m1(), _DINT4_A, _DINT4_B, _DINT4_C)}

# Until the accuracy study settles it, dint4-a is the default: it keeps a zero,
# keeps the int4 range on the positive side, and spends int4's wasted code.
DEFAULT_FORMAT = "dint4-a"


def get_format(name: str) -> CodeTable:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}") from None


def format_from_config(cfg: dict) -> CodeTable:
    """Rebuild a format from ``{"name", "values"}`` and check it matches our definition.

    The table travels in quantization_config so loaders never guess; a checkpoint
    whose table disagrees with the named format is refused rather than decoded wrong.
    """
    table = get_format(cfg["name"])
    values = [float(v) for v in cfg.get("values", table.values)]
    if len(values) != NUM_CODES or any(abs(a - b) > 0 for a, b in zip(values, table.values)):
        raise FormatError(
            f"quantization_config format table for {table.name!r} does not match this version's definition: "
            f"{values} != {list(table.values)}"
        )
    return table


# -- scales ---------------------------------------------------------------------

def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise FormatError(f"{what} has {bad} non-finite value(s) (NaN/Inf); refusing to quantize")


def resolve_group_size(k: int, group_size: int) -> int:
    """Return the effective group size for input dim ``k``; raise a clear error when it does not divide."""
    if group_size == PER_CHANNEL:
        return k
    if group_size <= 0:
        raise FormatError(f"group size must be positive or -1 (per channel), got {group_size}")
    if k % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if k % g == 0]
        hint = f"; group sizes that divide {k}: {divisors}" if divisors else ""
        raise FormatError(
            f"group size {group_size} does not divide the input dimension K={k}{hint}; or use -1 (per channel)"
        )
    return group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.dim() != 2:
        raise FormatError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    return w.reshape(n, k // g, g)


def absmax_scales(w: torch.Tensor, table: CodeTable, group_size: int = PER_CHANNEL, clip_ratio: float = 1.0) -> torch.Tensor:
    """Symmetric scales ``float32 [N, K // G]`` from the group's extremes.

    Sign-aware: for an asymmetric table (dint4-a's +7 / -6) the scale is the
    smallest one that puts both the max and the min of the group on the table.
    All-zero groups get scale 0, which decodes to exact zeros.
    """
    check_finite(w, "weight")
    if not 0 < clip_ratio <= 1:
        raise FormatError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    wg = _grouped(w.float(), group_size)
    pos = wg.amax(dim=-1).clamp(min=0) / table.max_positive
    neg = (-wg.amin(dim=-1)).clamp(min=0) / table.max_negative
    return (torch.maximum(pos, neg) * clip_ratio).float()


# -- rounding / codes ---------------------------------------------------------------

def round_to_codes(x: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """Nearest code (uint8) for values ``x`` already divided by the scale; ties toward zero.

    Values beyond the table saturate to its extremes.
    """
    vals, codes, mids = table._sorted
    xf = x.float()
    mids = mids.to(xf.device)
    # bucketize(right=False) sends a tie to the lower value, right=True to the upper:
    # pick per sign so the tie always lands on the smaller magnitude.
    idx = torch.where(
        xf >= 0,
        torch.bucketize(xf, mids, right=False),
        torch.bucketize(xf, mids, right=True),
    )
    return codes.to(xf.device)[idx]


def quantize_to_codes(
    w: torch.Tensor, scales: torch.Tensor, table: CodeTable, group_size: int = PER_CHANNEL
) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` for weight ``[N, K]`` and scales ``[N, K // G]``."""
    check_finite(w, "weight")
    check_finite(scales, "scales")
    wg = _grouped(w.float(), group_size)
    if scales.shape != wg.shape[:2]:
        raise FormatError(f"scales shape {tuple(scales.shape)} != expected {tuple(wg.shape[:2])}")
    s = scales.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    scaled = torch.where(s > 0, wg / safe, torch.zeros_like(wg))  # zero-scale group -> nearest-to-zero code
    return round_to_codes(scaled, table).reshape(w.shape)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, table: CodeTable, group_size: int = PER_CHANNEL,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """float ``[N, K]`` from codes ``uint8 [N, K]``."""
    n, k = codes.shape
    g = resolve_group_size(k, group_size)
    vals = table.value_lut(codes.device)[codes.long()].reshape(n, k // g, g)
    return (vals * scales.float().unsqueeze(-1)).reshape(n, k).to(dtype)


def fake_quantize(
    w: torch.Tensor, table: CodeTable, group_size: int = PER_CHANNEL, clip_ratio: float = 1.0
) -> torch.Tensor:
    """Quantize-dequantize a weight (same dtype out); what calibration losses see."""
    scales = absmax_scales(w, table, group_size, clip_ratio)
    codes = quantize_to_codes(w, scales, table, group_size)
    return dequantize_codes(codes, scales, table, group_size, dtype=w.dtype)


# -- packing ----------------------------------------------------------------------

def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` codes (0..15) -> ``uint8 [N, K // 2]``; column 2j low nibble, 2j+1 high."""
    if codes.dtype != torch.uint8:
        raise FormatError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise FormatError(f"codes must be [N, K] with even K, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= NUM_CODES:
        raise FormatError("codes must be < 16")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K // 2]`` -> codes ``uint8 [N, K]`` (inverse of :func:`pack_codes`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed weight must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def expand_to_int8(packed: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """int8 expansion ``[N, K]`` = 2 * value of each code; pair it with ``scales / 2``."""
    if sys.byteorder != "little" or packed.dim() != 2:
        return table.expansion_lut(packed.device)[unpack_codes(packed).long()]
    # One lookup per byte instead of per code: a 256-entry table of int8 pairs (even column = low
    # nibble first), read as int16 so each gather moves both codes. ~4x faster at model load.
    lut = table.expansion_lut(packed.device)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([lut[byte & 0xF], lut[byte >> 4]], dim=1).contiguous().view(torch.int16)[:, 0]
    return pairs[packed.contiguous().long()].view(torch.int8).reshape(packed.shape[0], packed.shape[1] * 2)


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed weight and what is needed to decode it.

    Float scales: ``scales [N, K // G]``, ``group_mult`` is None. Two-level: ``scales`` is the
    per-channel ``s [N, 1]`` and ``group_mult`` the unpacked multipliers ``uint8 [N, K // G]``.
    """

    packed: torch.Tensor  # uint8 [N, K // 2]
    scales: torch.Tensor  # float32 [N, K // G] (float) or [N, 1] (two-level)
    table: CodeTable
    group_size: int  # effective (never -1)
    group_mult: torch.Tensor | None = None  # uint8 [N, K // G], two-level only

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def scale_scheme(self) -> str:
        return FLOAT_SCALES if self.group_mult is None else TWO_LEVEL

    @property
    def epilogue_group_size(self) -> int:
        """Columns per float scale: the whole K for two-level (one integer GEMM), else the group size."""
        return self.shape[1] if self.group_mult is not None else self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group_mult is None:
            return dequantize_codes(unpack_codes(self.packed), self.scales, self.table, self.group_size, dtype)
        return dequantize_two_level(self.packed, self.group_mult, self.scales, self.table, self.group_size, dtype)

    def int8_expansion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w8 int8 [N, K], half_scales float32)`` with ``W = w8 * half_scales`` per epilogue group.

        Two-level: ``w8 = 2v * m`` and ``half_scales = s / 2`` is per channel ``[N, 1]``.
        """
        if self.group_mult is None:
            return expand_to_int8(self.packed, self.table), self.scales * 0.5
        return expand_two_level_to_int8(self.packed, self.group_mult, self.table, self.group_size), self.scales * 0.5


def quantize_weight(
    w: torch.Tensor, table: CodeTable, group_size: int = PER_CHANNEL,
    scales: torch.Tensor | None = None, clip_ratio: float = 1.0,
) -> QuantizedWeight:
    """Quantize ``[N, K]`` to a packed weight; scales from absmax (times ``clip_ratio``) unless given."""
    g = resolve_group_size(w.shape[-1], group_size)
    if scales is None:
        scales = absmax_scales(w, table, g, clip_ratio)
    codes = quantize_to_codes(w, scales, table, g)
    return QuantizedWeight(pack_codes(codes), scales.float().contiguous(), table, g)


def bits_needed_for_expansion(table: CodeTable) -> int:
    """Signed bit width of the int8 expansion (5 for the half-step formats): what hw_model multiplies."""
    m = max(abs(v) for v in table.half_values)
    return int(math.ceil(math.log2(m + 1))) + 1


# -- two-level scales: integer group multiplier x per-channel float --------------------------

def max_group_mult(table: CodeTable) -> int:
    """Largest multiplier m with ``|2v| * m <= 127`` for every code of ``table`` (and m fits 4 bits)."""
    return min(MULT_MAX_4BIT, INT8_MAX // max(abs(v) for v in table.half_values))


# Candidate per-channel scales, as fractions of ``row's largest group scale / max_m``: below 1 the
# largest group clips a little in exchange for finer multiplier steps on the others.
TWO_LEVEL_RATIOS: tuple[float, ...] = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)


def _group_sq_error(
    wg: torch.Tensor, scale: torch.Tensor, table: CodeTable, col_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``[..., ng]`` squared reconstruction error of ``wg [..., ng, G]`` quantized with ``scale [..., ng]``.

    ``col_weight`` (broadcasting to ``wg``) weights each element's squared error. The tie rule does
    not matter here (both neighbours of a tie are equally far), so one bucketize straight to values
    suffices; a zero scale reconstructs zeros.
    """
    vals, _, mids = table._sorted
    s = scale.unsqueeze(-1)
    x = wg / torch.where(s > 0, s, torch.ones_like(s))
    q = vals.to(wg.device)[torch.bucketize(x, mids.to(wg.device), out_int32=True)].mul_(s).sub_(wg).square_()
    return (q if col_weight is None else q.mul_(col_weight)).sum(-1)


def two_level_scales(
    w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None,
    ratios: tuple[float, ...] = TWO_LEVEL_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``s float32 [N, 1]`` and multipliers ``m uint8 [N, K // G]`` minimising each row's error.

    For every candidate ``s`` (``ratios`` of the row's largest absmax group scale / max_m) each
    group takes the better of the two integer multipliers bracketing its own absmax scale;
    each row then keeps the candidate with the smallest squared reconstruction error. An all-zero
    group gets ``m = 0`` (exact zeros even for a table without a zero code).
    ``row_clip [N]`` shrinks the absmax group scales first (the calibrated clip ratios).
    Pure and deterministic; vectorised over rows.
    """
    check_finite(w, "weight")
    g = resolve_group_size(w.shape[-1], group_size)
    wg = _grouped(w.float(), g)
    ideal = absmax_scales(w, table, g)
    if row_clip is not None:
        ideal = ideal * row_clip.to(ideal.device, torch.float32)[:, None]
    m_max = max_group_mult(table)
    top = ideal.amax(dim=1, keepdim=True)  # [N, 1]
    best_err = torch.full((w.shape[0],), math.inf, device=wg.device)
    best_s = torch.zeros_like(top)
    best_m = torch.ones_like(ideal)
    for r in ratios:
        s = top * r / m_max
        per_s = ideal / torch.where(s > 0, s, torch.ones_like(s))
        lo = per_s.floor().clamp(1, m_max)
        hi = per_s.ceil().clamp(1, m_max)
        err_lo, err_hi = _group_sq_error(wg, lo * s, table), _group_sq_error(wg, hi * s, table)
        m = torch.where(err_hi < err_lo, hi, lo)
        err = torch.minimum(err_lo, err_hi).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better[:, None], s, best_s)
        best_m = torch.where(better[:, None], m, best_m)
    best_m = torch.where(ideal > 0, best_m, torch.zeros_like(best_m))  # an all-zero group decodes to zeros
    return best_s.float().contiguous(), best_m.to(torch.uint8).contiguous()


# The searched choice (:func:`search_two_level_scales`): candidate per-channel scales as fractions of
# the row's largest absmax group scale / max_m (a superset of TWO_LEVEL_RATIOS, so per row the search is
# never worse than the closed form), and how many integers from ceil(absmax / s) down each group tries
# (its own clip on the integer grid). On real SmolLM2 weights (benchmarks/two_level_search.py) window 3
# reached the same error as every m in 0..max_m, and ratios below 0.7 or finer steps gained under 0.5 %.
TWO_LEVEL_SEARCH_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(16))  # 1.0 .. 0.7
TWO_LEVEL_MULT_WINDOW = 3
_SEARCH_ELEMENTS = 1 << 22  # elements per intermediate: candidates are evaluated in chunks of this size


def search_two_level_scales(
    w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None, ratios: tuple[float, ...] = TWO_LEVEL_SEARCH_RATIOS,
    window: int = TWO_LEVEL_MULT_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s float32 [N, 1]`` and ``m uint8 [N, K // G]`` chosen jointly per row to minimise its error.

    The error is ``sum_k col_weight[k] * (w[n, k] - q[n, k])^2`` (``col_weight [K]``: the diagonal of
    ``X^T X``, say; None: plain squared error). For each candidate ``s`` (``ratios`` x the row's largest
    absmax group scale / max_m) every group takes its best multiplier among ``m = 0`` (all zeros) and
    the ``window`` integers ``ceil(absmax_g / s), ...`` down to 1 (each group searches its own clip on
    the integer grid ``m * s``); the row keeps the candidate with the smallest summed error.
    ``row_clip [N]`` shrinks the absmax group scales first (the calibrated clip ratios bound the
    group scales from above). Ties keep the earlier candidate: the larger ratio, and ``m = 0`` over a
    multiplier that rounds the group to zeros too. Pure and deterministic; vectorised over rows and
    candidates (chunks of about ``_SEARCH_ELEMENTS`` elements).
    """
    check_finite(w, "weight")
    g = resolve_group_size(w.shape[-1], group_size)
    wg = _grouped(w.float(), g)
    n, ng, _ = wg.shape
    ideal = absmax_scales(w, table, g)
    if row_clip is not None:
        ideal = ideal * row_clip.to(ideal.device, torch.float32)[:, None]
    cw = None
    if col_weight is not None:
        check_finite(col_weight, "column weights")
        cw = col_weight.to(wg.device, torch.float32).reshape(1, 1, ng, g)
    m_max = max_group_mult(table)
    top = ideal.amax(dim=1, keepdim=True)  # [N, 1]
    zero_err = (wg.square() if cw is None else wg.square() * cw[0]).sum(-1)  # [N, ng]: m = 0
    best_err = torch.full((n,), math.inf, device=wg.device)
    best_s = torch.zeros_like(top)
    best_m = torch.zeros_like(ideal)
    r_all = torch.tensor(ratios, dtype=torch.float32, device=wg.device)
    chunk = max(1, _SEARCH_ELEMENTS // max(1, wg.numel()))
    for r in r_all.split(chunk):
        s = top * r / m_max  # [N, c]
        per_s = ideal[:, None, :] / torch.where(s > 0, s, torch.ones_like(s))[..., None]  # [N, c, ng]
        ceil = per_s.ceil().clamp(1, m_max)
        err = zero_err[:, None, :].expand_as(per_s).clone()
        mult = torch.zeros_like(per_s)
        for j in range(window):
            m = (ceil - j).clamp(min=1)
            e = _group_sq_error(wg[:, None], m * s[..., None], table, cw)
            better = e < err
            err = torch.where(better, e, err)
            mult = torch.where(better, m, mult)
        row_err, idx = err.sum(-1).min(dim=1)  # [N]: the first (largest-ratio) minimum
        better = row_err < best_err
        best_err = torch.where(better, row_err, best_err)
        best_s = torch.where(better[:, None], s.gather(1, idx[:, None]), best_s)
        best_m = torch.where(better[:, None], mult.gather(1, idx[:, None, None].expand(n, 1, ng))[:, 0], best_m)
    return best_s.float().contiguous(), best_m.to(torch.uint8).contiguous()


def quantize_two_level(
    w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None, search: bool = True,
) -> QuantizedWeight:
    """Quantize ``[N, K]`` with two-level scales: ``s`` and ``m`` from :func:`search_two_level_scales`
    (``col_weight [K]`` weights the error, e.g. diag(X^T X)), or with ``search=False`` from the closed
    form :func:`two_level_scales`; codes are then the nearest table values with group scale ``m * s``."""
    g = resolve_group_size(w.shape[-1], group_size)
    if search:
        s, m = search_two_level_scales(w, table, g, row_clip, col_weight)
    elif col_weight is not None:
        raise FormatError("the closed-form two-level scales take no column weights (use search=True)")
    else:
        s, m = two_level_scales(w, table, g, row_clip)
    codes = quantize_to_codes(w, m.float() * s, table, g)
    return QuantizedWeight(pack_codes(codes), s, table, g, m)


def check_group_mult(group_mult: torch.Tensor, table: CodeTable) -> None:
    """Unpacked multipliers must be uint8 in ``0..max_group_mult(table)`` (else the int8 expansion overflows)."""
    if group_mult.dtype != torch.uint8 or group_mult.dim() != 2:
        raise FormatError(f"group multipliers must be 2-D uint8, got {group_mult.dtype} {tuple(group_mult.shape)}")
    m_max = max_group_mult(table)
    if group_mult.numel() and int(group_mult.max()) > m_max:
        raise FormatError(f"group multiplier {int(group_mult.max())} > {m_max}: |2v|*m must fit int8 for {table.name}")


def packed_group_mult_shape(n: int, num_groups: int) -> tuple[int, int]:
    return n, (num_groups + 1) // 2


def pack_group_mult(group_mult: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, ng]`` (0..15) -> ``uint8 [N, ceil(ng / 2)]``; group 2j low nibble, 2j+1 high (0 pad)."""
    if group_mult.dtype != torch.uint8 or group_mult.dim() != 2:
        raise FormatError(f"group multipliers must be 2-D uint8, got {group_mult.dtype} {tuple(group_mult.shape)}")
    if group_mult.numel() and int(group_mult.max()) > MULT_MAX_4BIT:
        raise FormatError(f"group multipliers must be <= {MULT_MAX_4BIT} to fit a nibble")
    if group_mult.shape[1] % 2:
        group_mult = torch.cat([group_mult, group_mult.new_zeros(group_mult.shape[0], 1)], dim=1)
    return group_mult[:, 0::2] | (group_mult[:, 1::2] << 4)


def unpack_group_mult(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_mult`; refuses a non-zero pad nibble (a wrong group count)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed group multipliers must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (num_groups + 1) // 2:
        raise FormatError(f"packed group multipliers {tuple(packed.shape)} do not hold {num_groups} groups per row")
    m = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    if m.shape[1] > num_groups and bool((m[:, num_groups:] != 0).any()):
        raise FormatError("packed group multipliers: the pad nibble of an odd group count must be 0")
    return m[:, :num_groups].contiguous()


def multiply_groups(w8: torch.Tensor, group_mult: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 ``[N, K]`` code expansion times its group's multiplier (the caller guarantees it fits int8)."""
    n, k = w8.shape
    g = resolve_group_size(k, group_size)
    if tuple(group_mult.shape) != (n, k // g):
        raise FormatError(f"group multipliers {tuple(group_mult.shape)} != expected {(n, k // g)}")
    return (w8.reshape(n, k // g, g) * group_mult.to(device=w8.device, dtype=torch.int8).unsqueeze(-1)).reshape(n, k)


def expand_two_level_to_int8(
    packed: torch.Tensor, group_mult: torch.Tensor, table: CodeTable, group_size: int
) -> torch.Tensor:
    """int8 ``[N, K]`` = ``2v * m[n, k // G]`` (exact: ``|2v| * m <= 127`` by :func:`check_group_mult`)."""
    check_group_mult(group_mult, table)
    return multiply_groups(expand_to_int8(packed, table), group_mult, group_size)


def dequantize_two_level(
    packed: torch.Tensor, group_mult: torch.Tensor, scales: torch.Tensor, table: CodeTable, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """float ``[N, K]`` = ``value * m * s`` (equals the int8 expansion times ``s / 2`` exactly)."""
    codes = unpack_codes(packed)
    n, k = codes.shape
    g = resolve_group_size(k, group_size)
    vals = table.value_lut(codes.device)[codes.long()].reshape(n, k // g, g)
    return (vals * group_mult.float().unsqueeze(-1) * scales.float().reshape(n, 1, 1)).reshape(n, k).to(dtype)
