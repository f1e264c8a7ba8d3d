"""Properties of the one format definition (w4a8_dint.formats)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w4a8_dint import formats as F

ALL = sorted(F.FORMATS)


def test_known_tables():
    assert F.get_format("int4").values == tuple(float(v) for v in list(range(0, 8)) + [0] + list(range(-7, 0)))
    assert sorted({F.get_format("fp4").values[c] for c in F.get_format("fp4").used_codes}) == [
        -6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    a = F.get_format("dint4-a")
    assert sorted(a.values) == [-6, -5, -4, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 4, 5, 6, 7]
    assert not a.unused_codes
    b = F.get_format("dint4-b")
    assert not b.has_zero and min(abs(v) for v in b.values) == 0.5 and b.max_positive == b.max_negative == 7
    c = F.get_format("dint4-c")
    assert c.has_zero and c.max_positive == c.max_negative == 6 and len(c.used_codes) == 15


@pytest.mark.parametrize("name", ALL)
def test_expansion_is_twice_the_value_and_fits_int8(name):
    t = F.get_format(name)
    lut = t.expansion_lut()
    assert lut.dtype == torch.int8
    assert [int(v) for v in lut] == [round(2 * v) for v in t.values]
    assert F.bits_needed_for_expansion(t) <= 5  # a 5-bit signed "half-unit" weight


def test_unknown_format_and_table_mismatch():
    with pytest.raises(F.FormatError, match="unknown weight format"):
        F.get_format("int3")
    cfg = F.get_format("dint4-a").to_config()
    assert F.format_from_config(cfg).name == "dint4-a"
    cfg["values"] = list(cfg["values"])
    cfg["values"][3] = 9.0
    with pytest.raises(F.FormatError, match="does not match"):
        F.format_from_config(cfg)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(xs=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=64))
def test_rounding_is_nearest_and_in_table(name, xs):
    t = F.get_format(name)
    x = torch.tensor(xs, dtype=torch.float32)
    codes = F.round_to_codes(x, t)
    assert set(codes.tolist()) <= set(t.used_codes)  # never an unused code
    got = t.value_lut()[codes.long()]
    used_vals = torch.tensor([t.values[c] for c in t.used_codes])
    best = (x[:, None] - used_vals[None]).abs().min(dim=1).values
    assert torch.allclose((x - got).abs(), best, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_ties_go_toward_zero(name):
    t = F.get_format(name)
    vals = sorted(t.values[c] for c in t.used_codes)
    for lo, hi in zip(vals, vals[1:]):
        mid = (lo + hi) / 2
        got = t.values[int(F.round_to_codes(torch.tensor([mid]), t))]
        assert abs(got) == min(abs(lo), abs(hi)), (lo, hi, got)


def test_dint_keeps_small_weights_that_int4_flushes():
    w = torch.tensor([[7.0, 0.4, -0.45, 0.3, 3.0, -6.0, 1.0, 0.0]])
    int4 = F.fake_quantize(w, F.get_format("int4"))
    dint = F.fake_quantize(w, F.get_format("dint4-a"))
    assert int4[0, 1] == 0 and int4[0, 2] == 0  # underflow
    assert dint[0, 1] == 0.5 and dint[0, 2] == -0.5  # denormal half step


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 9), k_half=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(n, k_half, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, 2 * k_half), generator=g, dtype=torch.uint8)
    packed = F.pack_codes(codes)
    assert packed.shape == (n, k_half) and packed.dtype == torch.uint8
    assert torch.equal(F.unpack_codes(packed), codes)
    # documented nibble order: column 2j in the low nibble
    assert torch.equal(packed & 0xF, codes[:, 0::2])


@pytest.mark.parametrize("name", ALL)
def test_int8_expansion_of_every_byte(name):
    """The byte-pair lookup in expand_to_int8 equals the per-code table for all 256 bytes and any layout."""
    table = F.get_format(name)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    codes = F.unpack_codes(every_byte)
    want = torch.tensor([[round(2 * table.values[c]) for c in row] for row in codes.tolist()], dtype=torch.int8)
    assert torch.equal(F.expand_to_int8(every_byte, table), want)
    assert torch.equal(F.expand_to_int8(every_byte.t(), table), table.expansion_lut()[F.unpack_codes(every_byte.t()).long()])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("group", [-1, 8, 16])
def test_quantize_weight_round_trip_and_error_bound(name, group):
    t = F.get_format(name)
    w = torch.randn(12, 48, generator=torch.Generator().manual_seed(0))
    qw = F.quantize_weight(w, t, group)
    assert qw.packed.shape == (12, 24)
    assert qw.scales.shape == (12, 48 // (48 if group == -1 else group))
    deq = qw.dequantize()
    # int8 expansion reproduces the dequantized values exactly
    w8, half = qw.int8_expansion()
    g = qw.group_size
    assert torch.equal((w8.float().reshape(12, -1, g) * half[..., None]).reshape(12, 48), deq)
    # every value lies within half the largest table gap of the original (no clipping at clip_ratio=1)
    vals = sorted(t.values[c] for c in t.used_codes)
    max_gap = max(b - a for a, b in zip(vals, vals[1:]))
    err = (deq - w).abs().reshape(12, -1, g) / qw.scales[..., None]
    assert float(err.max()) <= max_gap / 2 + 1e-5


def test_asymmetric_table_scale_uses_both_sides():
    t = F.get_format("dint4-a")  # +7 / -6
    w = torch.tensor([[-6.0, 1.0, 0.0, 0.0], [7.0, -1.0, 0.0, 0.0]])
    s = F.absmax_scales(w, t)
    assert torch.allclose(s.flatten(), torch.tensor([1.0, 1.0]))
    assert torch.equal(F.fake_quantize(w, t), w)


def test_all_zero_rows_and_groups():
    for name in ALL:
        t = F.get_format(name)
        w = torch.zeros(3, 16)
        w[1, 8:] = torch.linspace(-1, 1, 8)
        qw = F.quantize_weight(w, t, 8)
        assert qw.scales[0].eq(0).all() and qw.scales[1, 0] == 0
        deq = qw.dequantize()
        assert deq[0].eq(0).all() and deq[1, :8].eq(0).all()  # exact zeros even without a zero code (dint4-b)
        assert torch.isfinite(deq).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 8)
    w[2, 3] = bad
    with pytest.raises(F.FormatError, match="non-finite"):
        F.quantize_weight(w, F.get_format("dint4-a"))


def test_group_size_must_divide_k():
    w = torch.randn(4, 576)
    with pytest.raises(F.FormatError, match=r"group size 128 does not divide .*K=576.*\[32, 64\]"):
        F.quantize_weight(w, F.get_format("int4"), 128)
    with pytest.raises(F.FormatError, match="positive or -1"):
        F.quantize_weight(w, F.get_format("int4"), 0)
    assert F.quantize_weight(w, F.get_format("int4"), 64).scales.shape == (4, 9)


def test_pack_rejects_bad_input():
    with pytest.raises(F.FormatError):
        F.pack_codes(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(F.FormatError):
        F.pack_codes(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(F.FormatError):
        F.pack_codes(torch.zeros(2, 4, dtype=torch.int32))


def test_clip_ratio_shrinks_scale():
    w = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    t = F.get_format("int4")
    assert torch.allclose(F.absmax_scales(w, t, clip_ratio=0.5), F.absmax_scales(w, t) * 0.5)
    with pytest.raises(F.FormatError):
        F.absmax_scales(w, t, clip_ratio=0.0)
