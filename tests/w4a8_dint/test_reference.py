"""The reference W4A8 linear is exact in its integer part and right in float."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w4a8_dint import formats as F
from w4a8_dint import reference as R


def _rand(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 33), n=st.integers(1, 20), groups=st.integers(1, 4), g=st.sampled_from([8, 16, 32]),
       seed=st.integers(0, 10_000), name=st.sampled_from(sorted(F.FORMATS)))
def test_integer_matmul_matches_float64_exactly(m, n, groups, g, seed, name):
    k = groups * g
    x = _rand((m, k), seed, 3.0)
    qw = F.quantize_weight(_rand((n, k), seed + 1), F.get_format(name), g)
    q_x, _ = R.quantize_activation_per_token(x)
    w8, _ = qw.int8_expansion()
    acc = R.int_matmul_grouped(q_x, w8, g)
    want = torch.einsum("mgk,ngk->gmn", q_x.double().reshape(m, groups, g), w8.double().reshape(n, groups, g))
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), want)


def test_large_k_int32_accumulation_is_exact():
    # K = 16384 with saturated operands: |sum| up to 127*14*16384 ~ 2.9e7 > 2**24 (float32 would round)
    k = 16384
    q_x = torch.full((2, k), 127, dtype=torch.int8)
    q_x[1, ::3] = -127
    w8 = torch.full((3, k), 14, dtype=torch.int8)
    w8[2, 1::2] = -13
    acc = R.int_matmul_grouped(q_x, w8, k)[0]
    want = q_x.long() @ w8.long().t()
    assert torch.equal(acc.long(), want)


@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("group", [-1, 32])
def test_linear_is_close_to_float(act_mode, group):
    x, w, b = _rand((7, 128), 0), _rand((24, 128), 1, 0.05), _rand((24,), 2)
    qw = F.quantize_weight(w, F.get_format("dint4-a"), group)
    inp = x.abs().max() / 127 if act_mode == "per-tensor" else None
    y = R.w4a8_linear_reference(x, qw, act_mode, inp, bias=b)
    ref = x @ qw.dequantize().t() + b
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.02, rel  # only the INT8 activation error remains
    y_fp = x @ w.t() + b
    assert (y - y_fp).norm() / y_fp.norm() < 0.15


def test_smooth_scale_is_applied_to_the_input():
    x, w = _rand((5, 64), 3), _rand((8, 64), 4)
    s = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    qw = F.quantize_weight(w * s, F.get_format("int4"))  # the weight carries s, the input is divided by it
    y = R.w4a8_linear_reference(x, qw, smooth_scale=s)
    ref = (x / s) @ qw.dequantize().t()
    assert torch.allclose(y, ref, rtol=0.05, atol=0.05 * ref.abs().max())


def test_activation_quant_edge_cases():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-2, 2, 16)
    q, s = R.quantize_activation_per_token(x)
    assert q[0].eq(0).all() and s[0] == 1 and q[1].abs().max() == 127
    with pytest.raises(F.FormatError):
        R.quantize_activation(x, "per-tensor")  # no scale
    with pytest.raises(F.FormatError):
        R.quantize_activation_per_tensor(x, 0.0)
    q, _ = R.quantize_activation_per_tensor(x * 100, 2 / 127)
    assert q.abs().max() == 127  # saturates
    with pytest.raises(F.FormatError, match="non-finite"):
        R.w4a8_linear_reference(torch.tensor([[float("nan")] * 8]), F.quantize_weight(torch.randn(2, 8), F.get_format("int4")))


def test_leading_dims_and_dtype_preserved():
    x = _rand((2, 3, 32), 6).bfloat16()
    qw = F.quantize_weight(_rand((4, 32), 7), F.get_format("fp4"), 16)
    y = R.w4a8_linear_reference(x, qw)
    assert y.shape == (2, 3, 4) and y.dtype == torch.bfloat16


# -- two-level scales: one integer GEMM per layer ---------------------------------------------

@pytest.mark.parametrize("name", sorted(F.FORMATS))
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
def test_two_level_linear_is_one_integer_gemm_with_per_channel_epilogue(name, act_mode, monkeypatch):
    m, n, k, g = 7, 24, 192, 32
    x = _rand((m, k), 1, 2.0)
    qw = F.quantize_two_level(_rand((n, k), 2, 0.1), F.get_format(name), g)
    bias = _rand((n,), 3)
    inp = (x.abs().max() / 127).reshape(1) if act_mode == "per-tensor" else None
    calls = []
    real = R.int_matmul_grouped
    monkeypatch.setattr(R, "int_matmul_grouped", lambda a, b, gs: calls.append(gs) or real(a, b, gs))
    y = R.w4a8_linear_reference(x, qw, act_mode, inp, bias=bias)
    assert calls == [k]  # one GEMM spanning K, not one per group
    # Exact integer part and the per-channel epilogue order: (acc * s/2) * s_x + bias, in float32.
    q_x, s_x = R.quantize_activation(x, act_mode, inp)
    w8 = (F.expand_to_int8(qw.packed, qw.table).long() * qw.group_mult.long().repeat_interleave(g, 1))
    acc = (q_x.double() @ w8.double().t()).float()
    assert torch.equal(y, acc * (qw.scales[:, 0] * 0.5) * s_x + bias)
    # And it is the layer: close to the float matmul of the dequantized weight.
    ref = x @ qw.dequantize().t() + bias
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_activation_quantizer_variants_agree():
    x = _rand((5, 64), 4, 3.0)
    q, s = R.quantize_activation_per_token(x)
    q2, s2 = R.quantize_activation_per_token(x, absmax=R.row_absmax(x))
    assert torch.equal(q, q2) and torch.equal(s, s2)
    # A larger (TP-reduced) absmax gives the coarser scale of the whole row.
    q3, s3 = R.quantize_activation_per_token(x, absmax=R.row_absmax(x) * 2)
    assert torch.equal(s3, s * 2) and q3.abs().max() <= 64
    qs, ss = R.quantize_activation_static(x, torch.tensor([0.02]))
    qp, sp = R.quantize_activation_per_tensor(x, torch.tensor([0.02]))
    assert torch.equal(qs, qp) and torch.equal(ss, sp)
    with pytest.raises(F.FormatError):
        R.quantize_activation_per_tensor(x, torch.tensor([0.0]))
