"""Kernel selection and the CPU int8 kernel's bit-exactness against the reference."""

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.config import quantized_weight_tensors
from w4a8_dint.kernels.linear import KERNELS, CpuInt8Kernel, ReferenceKernel, W4A8LayerSpec, choose_kernel


@pytest.mark.parametrize("group", [-1, 64])
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("m", [1, 5, 37])
def test_cpu_int8_matches_reference_bit_for_bit(group, act_mode, m):
    g = torch.Generator().manual_seed(m)
    n, k = 48, 192
    w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g) * 4, torch.randn(n, generator=g)
    table = F.get_format("dint4-a")
    qw = F.quantize_weight(w, table, group)
    spec = W4A8LayerSpec(n, k, qw.group_size, table, act_mode)
    inp = torch.tensor([x.abs().max() / 127]) if act_mode == "per-tensor" else None
    sm = torch.rand(k, generator=g) + 0.5
    outs = []
    for cls in (ReferenceKernel, CpuInt8Kernel):
        kern = cls(spec)
        outs.append(kern.apply(kern.prepare(qw.packed, qw.scales), x, inp, sm, b))
    assert torch.equal(outs[0], outs[1])


def test_choose_kernel_says_why():
    spec = W4A8LayerSpec(8, 64, 64, F.get_format("int4"), "per-token")
    cls, skipped = choose_kernel(spec, "cpu")
    assert cls is CpuInt8Kernel and skipped == [] or all(":" in s for s in skipped)
    assert not CpuInt8Kernel.can_implement(spec, torch.device("meta"))[0]
    assert "CPU" in CpuInt8Kernel.can_implement(spec, torch.device("meta"))[1]
    with pytest.raises(ValueError, match="unknown kernel"):
        choose_kernel(spec, "cpu", prefer="nope")


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
def test_two_level_kernels_match_reference_with_one_integer_gemm(fmt, act_mode, monkeypatch):
    g = torch.Generator().manual_seed(7)
    n, k, m = 40, 576, 9  # 9 groups of 64: an odd count (the packed multipliers' pad nibble)
    w, x, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g) * 3, torch.randn(n, generator=g)
    table = F.get_format(fmt)
    qw = F.quantize_two_level(w, table, 64)
    mult = quantized_weight_tensors("p", qw)["p.weight_group_mult"]
    spec = W4A8LayerSpec(n, k, 64, table, act_mode, F.TWO_LEVEL, has_bias=True)
    sm = torch.rand(k, generator=g) + 0.5
    inp = ((x / sm).abs().max() / 127).reshape(1) if act_mode == "per-tensor" else None
    from w4a8_dint.reference import cpu_int8_gemm_exact_full_range

    per_layer = 1 if cpu_int8_gemm_exact_full_range() else 2  # no VNNI: the weight is split (exact) in two
    gemms = []
    real_int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, bt: gemms.append(a.shape) or real_int_mm(a, bt))
    outs = []
    for cls in (ReferenceKernel, CpuInt8Kernel):
        kern = cls(spec)
        outs.append(kern.apply(kern.prepare(qw.packed, qw.scales, mult), x, inp, sm, b))
    assert torch.equal(outs[0], outs[1])
    assert gemms == [(m, k)] * 2 * per_layer  # one K-wide integer GEMM per layer in each kernel (two without VNNI)
    assert (outs[1] - (x / sm) @ qw.dequantize().t() - b).abs().max() < 0.05 * outs[1].abs().max()


def test_prepare_checks_tensors_against_the_spec():
    table = F.get_format("dint4-a")
    qw = F.quantize_two_level(torch.randn(8, 128), table, 64)
    mult = F.pack_group_mult(qw.group_mult)
    two = CpuInt8Kernel(W4A8LayerSpec(8, 128, 64, table, "per-token", F.TWO_LEVEL))
    with pytest.raises(ValueError, match="need weight_group_mult"):
        two.prepare(qw.packed, qw.scales)
    with pytest.raises(ValueError, match="weight_scale"):
        two.prepare(qw.packed, torch.ones(8, 2), mult)
    with pytest.raises(ValueError, match="take no weight_group_mult"):
        CpuInt8Kernel(W4A8LayerSpec(8, 128, 128, table, "per-token")).prepare(qw.packed, qw.scales, mult)
    with pytest.raises(ValueError, match="must fit int8"):
        two.prepare(qw.packed, qw.scales, torch.full_like(mult, 0xAA))


def test_kernel_contract_is_on_the_base_class():
    # Every kernel is built from the spec alone and says whether it honours a TP absmax reduce.
    from w4a8_dint.kernels.base import W4A8LinearKernel

    assert all(issubclass(k, W4A8LinearKernel) and isinstance(k.supports_absmax_reduce, bool) for k in KERNELS)
    assert isinstance(KERNELS, tuple)  # static: nothing registers into it
    spec = W4A8LayerSpec(8, 64, 64, F.get_format("int4"), "per-token")
    with pytest.raises(ValueError, match="absmax_reduce"):
        kern = CpuInt8Kernel(spec)
        qw = F.quantize_weight(torch.randn(8, 64), spec.table, 64)
        kern.apply(kern.prepare(qw.packed, qw.scales), torch.randn(2, 64), absmax_reduce=lambda a: a)


@pytest.mark.parametrize("bound", [14, 64, 127])
def test_integer_gemm_exact_for_full_int8_range_on_any_cpu(bound):
    """Without VNNI (AVX2, AVX512 without VNNI; tests/vllm_w4a8/test_cpu_kernel_isa.py forces it) the
    CPU's int8 GEMM adds u8 x s8 pairs in saturating int16; two-level weights reach |127|, so the
    reference (and cpu-int8, which calls it) must split them. Checked against exact int64 math."""
    from w4a8_dint.reference import _int_mm

    g = torch.Generator().manual_seed(bound)
    a = torch.randint(-127, 128, (9, 576), generator=g).to(torch.int8)
    a[0] = 127  # worst case for the pair sums
    b = torch.randint(-bound, bound + 1, (40, 576), generator=g).to(torch.int8)
    b[0] = bound
    assert torch.equal(_int_mm(a, b).long(), a.long() @ b.long().t())
