"""What every unit must compute, from plain integer / IEEE arithmetic and the format tables.

The table-driven units are checked against ``formats``' int8 expansion
(``expansion_lut[code] * a``, in half units); the native INT4/INT8 units against
two's-complement integers; the FP16 unit against numpy float32 (the fp16 product
is exact in fp32, and numpy adds with round-to-nearest-even).
"""

from __future__ import annotations

import numpy as np

from w4a8_dint.hw_model.units import UnitSpec


def wrap_signed(x: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement wrap of int64 values to ``bits`` (what a register of that width holds)."""
    m = np.int64(1) << bits
    x = np.asarray(x, dtype=np.int64) & (m - 1)
    return np.where(x >= (m >> 1), x - m, x)


def nibble_value(codes: np.ndarray) -> np.ndarray:
    """Native two's-complement value of a 4-bit code (code 8 is -8)."""
    c = np.asarray(codes, dtype=np.int64) & 0xF
    return np.where(c >= 8, c - 16, c)


def fp16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def products(spec: UnitSpec, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Expected product per pair: int64 (integer or half units), or uint32 fp32 bits for fp16.

    ``w`` holds raw weight bits (4-bit codes, int8 or fp16 patterns); ``a`` int8 values
    (or fp16 bit patterns for the FP unit).
    """
    w = np.asarray(w)
    a = np.asarray(a)
    if spec.style == "fp":
        return (fp16_bits_to_f32(w) * fp16_bits_to_f32(a)).view(np.uint32)
    a64 = a.astype(np.int64)
    if spec.weight == "int8":
        return w.astype(np.int64).astype(np.int8).astype(np.int64) * a64
    if spec.style == "native":  # int4 nibble
        return nibble_value(w) * a64
    lut = spec.table.expansion_lut().numpy().astype(np.int64)  # the one definition: 2 * value
    return lut[w.astype(np.int64) & 0xF] * a64


def accumulate(spec: UnitSpec, w: np.ndarray, a: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Register contents after each cycle for ``[T, lanes]`` operand streams.

    ``first[t]`` loads the product instead of adding it (start of a dot product).
    """
    p = products(spec, w, a)
    first = np.asarray(first, dtype=bool)
    out = np.empty(p.shape, dtype=p.dtype)
    if spec.style == "fp":
        pf = p.view(np.float32)
        acc = np.zeros(p.shape[1:], dtype=np.float32)
        for t in range(p.shape[0]):
            acc = np.where(first[t], pf[t], acc + pf[t]).astype(np.float32)
            out[t] = acc.view(np.uint32)
        return out
    acc = np.zeros(p.shape[1:], dtype=np.int64)
    for t in range(p.shape[0]):
        acc = wrap_signed(np.where(first[t], p[t], acc + p[t]), spec.out_bits)
        out[t] = acc
    return out


def to_half_units(spec: UnitSpec, y: np.ndarray) -> np.ndarray:
    """Integer results in the int8-expansion scale (half units) whatever the unit's native LSB."""
    return np.asarray(y, dtype=np.int64) * (2 if spec.product_unit == "integer" else 1)
