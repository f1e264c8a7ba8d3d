"""The textbook cost model, shown beside the synthesized numbers.

Energy: Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm / 0.9 V (as transcribed in
shared/notes/papers.md section 4.1): int8 add 0.03 pJ, int32 add 0.1 pJ, int8 mult 0.2 pJ,
int32 mult 3.1 pJ, fp16 mult 1.1 pJ, fp32 add 0.9 pJ. Two scaling rules on top:

* integer multiplier energy and area scale with the partial-product count ``b_a * b_w``
  (Horowitz' own 8 -> 32 bit mult goes 0.2 -> 3.1 pJ = 15.5x for 16x the bit products);
* integer adder energy and area scale linearly with width (fit through 8 bit 0.03 and 32 bit 0.1).

Area in full-adder equivalents: ``b_a * b_w`` (one adder cell per partial product) plus the
accumulator width (adder) plus the register (a 16-transistor flop is ~0.57 of a 28-transistor
full adder). No FP16 analytic area: its cost is dominated by shifters and normalization that a
bit-product count does not describe.
"""

from __future__ import annotations

from w4a8_dint.formats import bits_needed_for_expansion
from w4a8_dint.hw_model.units import ACT_BITS, UnitSpec

HOROWITZ_45NM_PJ: dict[str, float] = {
    "int8_add": 0.03, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp16_mult": 1.1, "fp32_add": 0.9, "fp32_mult": 3.7,
}
FLOP_PER_FULL_ADDER = 16 / 28


def int_add_pj(width: int) -> float:
    lo, hi = HOROWITZ_45NM_PJ["int8_add"], HOROWITZ_45NM_PJ["int32_add"]
    return lo + (width - 8) * (hi - lo) / 24


def int_mult_pj(bits_a: int, bits_w: int) -> float:
    return HOROWITZ_45NM_PJ["int8_mult"] * bits_a * bits_w / 64


def multiplier_weight_bits(spec: UnitSpec) -> int:
    """Width of the weight operand that actually enters the multiplier array."""
    if spec.style == "twos":
        return bits_needed_for_expansion(spec.table)
    return {"native": spec.weight_bits, "signmag": 4, "shift": 3}.get(spec.style, 0)


def energy_pj(spec: UnitSpec) -> float:
    """Energy per MAC (or per multiply for a multiplier-only unit), pJ at 45 nm."""
    if spec.style == "fp":
        return HOROWITZ_45NM_PJ["fp16_mult"] + (HOROWITZ_45NM_PJ["fp32_add"] if spec.accumulate else 0.0)
    e = int_mult_pj(ACT_BITS, multiplier_weight_bits(spec))
    return e + (int_add_pj(spec.out_bits) if spec.accumulate else 0.0)


def area_fa(spec: UnitSpec) -> float | None:
    """Area in full-adder equivalents; None for FP16 (see module docstring)."""
    if spec.style == "fp":
        return None
    a = float(ACT_BITS * multiplier_weight_bits(spec))
    if spec.accumulate:
        a += spec.out_bits * (1 + FLOP_PER_FULL_ADDER)
    return a
