"""The torch.ops.w4a8_dint custom ops: exact against the reference, traceable, clear on bad input."""

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.formats import FormatError
from w4a8_dint.kernels import ops
from w4a8_dint.kernels.linear import CpuInt8Kernel, OneDnnInt8Kernel, TritonW4A8Kernel, W4A8LayerSpec, choose_kernel
from w4a8_dint.reference import quantize_activation, w4a8_linear_reference


def _case(m, n, k, group, fmt, seed, act_mode="per-token"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * 3 + 0.1
    qw = F.quantize_weight(w, F.get_format(fmt), group)
    smooth = torch.rand(k, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    inp = torch.tensor([float(x.abs().max()) / 127 * 0.7]) if act_mode == "per-tensor" else None  # some saturate
    return x, qw, smooth, bias, inp


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
@pytest.mark.parametrize("group", [-1, 32])
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("packed", [True, False])
def test_linear_op_equals_reference_bit_for_bit(fmt, group, act_mode, packed):
    x, qw, smooth, bias, inp = _case(7, 24, 96, group, fmt, seed=len(fmt) + group, act_mode=act_mode)
    want = w4a8_linear_reference(x, qw, act_mode, inp, smooth, bias)
    w8, half = qw.int8_expansion()
    weight = qw.packed if packed else w8
    got = ops.w4a8_linear(x, weight, half, qw.table.expansion_lut(), group, act_mode, inp, smooth, bias)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_op_keeps_leading_dims_and_dtype(dtype):
    x, qw, smooth, bias, _ = _case(6, 16, 64, 32, "dint4-a", seed=3)
    x = x.reshape(2, 3, 64).to(dtype)
    want = w4a8_linear_reference(x, qw, "per-token", None, smooth.to(dtype), bias.to(dtype))
    got = ops.w4a8_linear(x, qw.packed, qw.scales * 0.5, qw.table.expansion_lut(), 32,
                          smooth_scale=smooth.to(dtype), bias=bias.to(dtype))
    assert got.shape == (2, 3, 16) and got.dtype == dtype
    assert torch.equal(got, want)


def test_split_ops_compose_to_the_linear_op():
    x, qw, smooth, bias, inp = _case(5, 20, 128, 64, "fp4", seed=11, act_mode="per-tensor")
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5
    q, s = torch.ops.w4a8_dint.quantize_activation(x, "per-tensor", inp, smooth)
    q_ref, s_ref = quantize_activation(x / smooth, "per-tensor", inp)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    y = torch.ops.w4a8_dint.w4a8_gemm(q, s, qw.packed, half, lut, 64, bias, torch.float32)
    assert torch.equal(y, ops.w4a8_linear(x, qw.packed, half, lut, 64, "per-tensor", inp, smooth, bias))


def test_zero_tokens_and_zero_rows():
    x, qw, *_ = _case(4, 8, 64, -1, "int4", seed=5)
    x[1] = 0  # an all-zero token quantizes to zeros with scale 1 (not NaN)
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5
    y = ops.w4a8_linear(x, qw.packed, half, lut, -1)
    assert torch.equal(y, w4a8_linear_reference(x, qw)) and torch.equal(y[1], torch.zeros(8))
    assert ops.w4a8_linear(x[:0], qw.packed, half, lut, -1).shape == (0, 8)


def test_fake_impls_give_shapes_without_computing():
    k, n = 64, 12
    meta = dict(device="meta")
    x = torch.empty(3, 5, k, dtype=torch.bfloat16, **meta)
    w = torch.empty(n, k // 2, dtype=torch.uint8, **meta)
    half = torch.empty(n, 2, **meta)
    lut = torch.empty(16, dtype=torch.int8, **meta)
    y = torch.ops.w4a8_dint.w4a8_linear(x, w, half, lut, 32, "per-token", None, None, None)
    assert (y.shape, y.dtype, y.device.type) == ((3, 5, n), torch.bfloat16, "meta")
    q, s = torch.ops.w4a8_dint.quantize_activation(x[0], "per-token", None, None)
    assert (q.shape, q.dtype, s.shape, s.dtype) == ((5, k), torch.int8, (5, 1), torch.float32)
    y = torch.ops.w4a8_dint.w4a8_gemm(q, s, w, half, lut, 32, None, torch.float16)
    assert (y.shape, y.dtype) == ((5, n), torch.float16)


def test_opcheck_schema_fake_and_aliasing():
    x, qw, smooth, bias, inp = _case(3, 8, 64, 32, "dint4-c", seed=9, act_mode="per-tensor")
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5
    torch.library.opcheck(torch.ops.w4a8_dint.w4a8_linear.default,
                          (x, qw.packed, half, lut, 32, "per-tensor", inp, smooth, bias))
    torch.library.opcheck(torch.ops.w4a8_dint.quantize_activation.default, (x[:1], "per-tensor", inp, None))
    q, s = torch.ops.w4a8_dint.quantize_activation(x, "per-token", None, None)
    torch.library.opcheck(torch.ops.w4a8_dint.w4a8_gemm.default, (q, s, qw.packed, half, lut, 32, None, torch.bfloat16))


def test_compiled_fullgraph_matches_eager_exactly():
    x, qw, smooth, bias, _ = _case(9, 24, 64, 32, "dint4-a", seed=1)
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5

    def layer(inp):  # inductor fuses the (exact) float ops around it; the op stays one opaque node
        return ops.w4a8_linear(inp * 2, qw.packed, half, lut, 32, "per-token", None, smooth, bias) * 0.5

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for m in (9, 4):  # a second M reuses the dynamic-shape graph
        assert torch.equal(compiled(x[:m]), layer(x[:m]))


def test_bad_inputs_are_refused_clearly():
    x, qw, *_ = _case(2, 8, 64, 32, "int4", seed=2)
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5
    with pytest.raises(FormatError, match="does not divide"):
        ops.w4a8_linear(x, qw.packed, half, lut, 48)
    with pytest.raises(FormatError, match="does not match weight K"):
        ops.w4a8_linear(x[:, :32], qw.packed, half, lut, 32)
    with pytest.raises(FormatError, match="half_scales"):
        ops.w4a8_linear(x, qw.packed, half[:, :1], lut, 32)
    with pytest.raises(FormatError, match="input_scale"):
        ops.w4a8_linear(x, qw.packed, half, lut, 32, "per-tensor")
    with pytest.raises(FormatError, match="activation mode"):
        ops.w4a8_linear(x, qw.packed, half, lut, 32, "per-row")
    with pytest.raises(FormatError, match="lut"):
        ops.w4a8_linear(x, qw.packed, half, lut[:8], 32)
    with pytest.raises(FormatError, match="int8 .* or uint8"):
        ops.w4a8_linear(x, qw.packed.int(), half, lut, 32)
    with pytest.raises(FormatError, match="bias"):
        ops.w4a8_linear(x, qw.packed, half, lut, 32, bias=torch.zeros(7))


def test_kernel_classes_route_through_the_op_and_say_why():
    x, qw, smooth, bias, _ = _case(3, 16, 64, 32, "dint4-b", seed=4)
    spec = W4A8LayerSpec(16, 64, 32, qw.table, "per-token")
    cls, skipped = choose_kernel(spec, "cpu")
    assert cls in (OneDnnInt8Kernel, CpuInt8Kernel)  # oneDNN wherever vLLM is loaded in this process
    assert skipped[0] == "triton-w4a8: needs a CUDA device (got cpu)"
    kern = CpuInt8Kernel(spec)
    y = torch.compile(lambda t: kern.apply(kern.prepare(qw.packed, qw.scales), t, None, smooth, bias), fullgraph=True)(x)
    assert torch.equal(y, w4a8_linear_reference(x, qw, "per-token", None, smooth, bias))
    ok, why = TritonW4A8Kernel.can_implement(spec, torch.device("cpu"))
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("fmt", ["dint4-a", "fp4"])
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
def test_two_level_op_equals_reference_packed_and_expanded(fmt, act_mode):
    x, _, smooth, bias, inp = _case(5, 24, 96, 32, fmt, seed=11, act_mode=act_mode)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(12)) * 0.1
    qw = F.quantize_two_level(w, F.get_format(fmt), 32)
    want = w4a8_linear_reference(x, qw, act_mode, inp, smooth, bias)
    lut, half = qw.table.expansion_lut(), qw.scales * 0.5
    packed = ops.w4a8_linear(x, qw.packed, half, lut, 32, act_mode, inp, smooth, bias, qw.group_mult)
    w8, _ = qw.int8_expansion()  # what the CPU kernel keeps: 2v*m, one group spanning K
    expanded = ops.w4a8_linear(x, w8, half, lut, 96, act_mode, inp, smooth, bias)
    assert torch.equal(packed, want) and torch.equal(expanded, want)
    torch.library.opcheck(torch.ops.w4a8_dint.w4a8_linear.default,
                          (x, qw.packed, half, lut, 32, act_mode, inp, smooth, bias, qw.group_mult))
    with pytest.raises(FormatError, match="per channel"):
        ops.w4a8_linear(x, qw.packed, torch.ones(24, 3), lut, 32, group_mult=qw.group_mult)
    with pytest.raises(FormatError, match="group_mult must be"):
        ops.w4a8_linear(x, qw.packed, half, lut, 32, group_mult=qw.group_mult[:, :2])
    with pytest.raises(FormatError, match="packed uint8"):
        ops.w4a8_linear(x, w8, half, lut, 32, group_mult=qw.group_mult)
