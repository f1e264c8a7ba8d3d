"""RTL of the MAC units, simulated in Amaranth, against the format tables and plain arithmetic.

Every 4-bit unit is checked exhaustively (16 codes x 256 int8 activations) against
``formats``' int8 expansion; INT8 x INT8 over all 65 536 pairs; accumulators over
shuffled sequences of all pairs and a worst-case K=4096 run (no wrap).
"""

import numpy as np
import pytest

from w4a8_dint import formats as F
from w4a8_dint.hw_model import golden
from w4a8_dint.hw_model.simulate import simulate_accumulate, simulate_products
from w4a8_dint.hw_model.units import (
    DEFAULT_K, DESIGNS, UnitError, UnitSpec, accumulator_bits, shift_decode, signmag_decode, spec_from_key,
    twos_decode,
)

FOUR_BIT = [(w, s) for w, s in DESIGNS if w not in ("int8", "fp16")]
ACTS = np.arange(-128, 128)


def all_pairs(codes: int = 16):
    w, a = np.meshgrid(np.arange(codes), ACTS, indexing="ij")
    return w.ravel(), a.ravel()


def expected_half_units(weight: str, style: str, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Straight from the format module: expansion_lut[code] * a (native int4: the nibble, code 8 = -8)."""
    if style == "native":
        return 2 * np.where(w >= 8, w - 16, w) * a
    lut = F.get_format(weight).expansion_lut().numpy().astype(np.int64)
    return lut[w] * a


@pytest.mark.parametrize("weight,style", FOUR_BIT)
def test_multiplier_exhaustive_against_format_expansion(weight, style):
    spec = UnitSpec(weight, style, accumulate=False)
    w, a = all_pairs()
    y = simulate_products(spec, w, a)
    got = golden.to_half_units(spec, y)
    assert np.array_equal(got, expected_half_units(weight, style, w, a))
    if style == "native":  # the nibble agrees with the int4 table on every code the table uses
        table = F.get_format("int4")
        used = np.isin(w, table.used_codes)
        assert np.array_equal(got[used], expected_half_units("int4", "twos", w, a)[used])
        assert table.unused_codes == (8,)


def test_int8_multiplier_exhaustive():
    spec = UnitSpec("int8", "native", accumulate=False)
    w, a = np.meshgrid(np.arange(256), ACTS, indexing="ij")
    y = simulate_products(spec, w.ravel(), a.ravel())
    assert np.array_equal(y, w.ravel().astype(np.int8).astype(np.int64) * a.ravel())


@pytest.mark.parametrize("weight,style", FOUR_BIT + [("int8", "native")])
def test_accumulator_over_all_pairs_in_random_order(weight, style):
    spec = UnitSpec(weight, style)
    rng = np.random.default_rng(hash((weight, style)) % 2**32)
    w, a = all_pairs(1 << spec.weight_bits if spec.weight_bits == 4 else 16)
    if weight == "int8":
        w = rng.integers(0, 256, w.size)
    order = rng.permutation(w.size)
    w, a = w[order], a[order]
    first = rng.random(w.size) < 1 / 64
    first[0] = True
    y = simulate_accumulate(spec, w, a, first)
    # independent reference: running sums of the expansion, restarted at every `first`
    p = expected_half_units(weight, "twos" if style != "native" else "native", w, a)
    if style == "native" and weight == "int8":
        p = 2 * w.astype(np.int8).astype(np.int64) * a
    seg = np.cumsum(first) - 1
    exp = np.empty_like(p)
    for s in np.unique(seg):
        idx = seg == s
        exp[idx] = np.cumsum(p[idx])
    assert np.array_equal(golden.to_half_units(spec, y), exp)


@pytest.mark.parametrize("key", ["int8/mac", "int4/mac", "dint4-a/shift/mac", "dint4-b/shift/mac"])
def test_accumulator_width_holds_k_worst_case_products(key):
    spec = spec_from_key(key)
    if spec.style == "native":
        worst_w = 0x80 if spec.weight == "int8" else 8  # -128 / -8 times -128
    else:
        worst_w = int(np.argmax(np.abs(spec.table.half_values)))
    w = np.full(spec.k, worst_w)
    a = np.full(spec.k, -128)
    first = np.zeros(spec.k, bool)
    first[0] = True
    y = simulate_accumulate(spec, w, a, first)
    per = int(golden.products(spec, w[:1], a[:1])[0])
    assert y[-1] == spec.k * per  # largest magnitude reachable in K steps, no wrap
    assert abs(spec.k * per) >= 2 ** (spec.out_bits - 2)  # ... and the width is not wasteful either


def test_accumulator_widths():
    assert accumulator_bits(128 * 128, 4096) == 28  # INT8 x INT8: 8 + 8 + log2(4096)
    assert accumulator_bits(8 * 128, 4096) == 24  # INT4 x INT8
    assert accumulator_bits(14 * 128, 4096) == 24  # dINT4 in half units: the extra LSB fits (|v| <= 7)
    assert UnitSpec("dint4-a", "shift").out_bits == 24
    assert UnitSpec("int8", "native").out_bits == 28
    # LLaMA-7B down_proj K=11008: 11008 * 2**14 < 2**28, one bit less than 8 + 8 + ceil(log2 K) = 30
    assert UnitSpec("int8", "native", k=11008).out_bits == 29


def test_decoders_are_generated_from_the_tables():
    for name in ("dint4-a", "dint4-b", "dint4-c", "int4"):
        t = F.get_format(name)
        assert twos_decode(t) == t.half_values
        assert [(-1 if n else 1) * m for n, m in signmag_decode(t)] == list(t.half_values)
        rebuilt = [(-1 if c.negative else 1) * (1 if c.half else 2 * c.magnitude) for c in shift_decode(t)]
        assert rebuilt == list(t.half_values)
    assert any(c.half for c in shift_decode(F.get_format("dint4-a")))
    with pytest.raises(UnitError, match="value 1.5"):
        shift_decode(F.get_format("fp4"))  # 1.5 is neither an integer nor the +-1/2 denormal


def test_bad_specs_are_refused():
    with pytest.raises(UnitError, match="native"):
        UnitSpec("int8", "twos")
    with pytest.raises(UnitError, match="unknown style"):
        UnitSpec("dint4-a", "booth")
    with pytest.raises(UnitError, match="shift style"):
        UnitSpec("fp4", "shift")
    with pytest.raises(F.FormatError, match="unknown weight format"):
        UnitSpec("int3", "twos")
    with pytest.raises(UnitError, match="bad unit key"):
        spec_from_key("dint4-a/shift")
    assert spec_from_key("dint4-a/shift/mul") == UnitSpec("dint4-a", "shift", False, DEFAULT_K)


# -- FP16 x FP16 + FP32 ----------------------------------------------------------------------------

def _finite_fp16(rng, n):
    bits = rng.integers(0, 1 << 16, n)
    return bits[(bits & 0x7C00) != 0x7C00]


def test_fp16_multiplier_exact_in_fp32():
    rng = np.random.default_rng(1)
    spec = UnitSpec("fp16", "fp", accumulate=False)
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x3555])
    w = np.concatenate([np.repeat(special, special.size), _finite_fp16(rng, 1500)])
    a = np.concatenate([np.tile(special, special.size), _finite_fp16(rng, 1500)])
    n = min(w.size, a.size)
    w, a = w[:n], a[:n]
    y = simulate_products(spec, w, a)
    exp = (w.astype(np.uint16).view(np.float16).astype(np.float32) * a.astype(np.uint16).view(np.float16).astype(np.float32))
    assert np.array_equal(y, exp.view(np.uint32))


def test_fp16_fma_rounds_like_ieee_fp32_with_cancellation():
    rng = np.random.default_rng(2)
    spec = UnitSpec("fp16", "fp")
    # Values of similar magnitude and both signs: long sums, many roundings, exact and near cancellations.
    x = (rng.standard_normal(1200) * rng.choice([1, 1e-3, 30], 1200)).astype(np.float16)
    wv = rng.standard_normal(1200).astype(np.float16)
    x[1::7] = -x[0::7][: x[1::7].size]  # exact cancellation partners
    wv[1::7] = wv[0::7][: wv[1::7].size]
    x[::97] = np.float16(0)
    w = wv.view(np.uint16).astype(np.int64)
    a = x.view(np.uint16).astype(np.int64)
    first = rng.random(w.size) < 1 / 50
    first[0] = True
    y = simulate_accumulate(spec, w, a, first)
    exp = golden.accumulate(spec, w[:, None], a[:, None], first[:, None])[:, 0]
    assert np.array_equal(y, exp)
    assert (y == 0).any()  # exact cancellation reached (+0)
