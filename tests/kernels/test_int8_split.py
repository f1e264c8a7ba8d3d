"""The int8 GEMM's saturation split (CPUs without VNNI) is decided from the weight once at load, not per call."""

import torch

from w4a8_dint import formats as F
from w4a8_dint import reference
from w4a8_dint.config import quantized_weight_tensors
from w4a8_dint.kernels.linear import CpuInt8Kernel, W4A8LayerSpec


def _count_int_mm(monkeypatch) -> list:
    calls: list = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    monkeypatch.setattr(reference, "cpu_int8_gemm_exact_full_range", lambda: False)  # as without VNNI
    return calls


def test_int_mm_uses_the_given_weight_absmax(monkeypatch):
    calls = _count_int_mm(monkeypatch)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 64), generator=g).to(torch.int8)
    small = torch.randint(-14, 15, (8, 64), generator=g).to(torch.int8)
    exact = a.long() @ small.long().t()
    assert torch.equal(reference._int_mm(a, small).long(), exact) and len(calls) == 1  # measured: no split
    assert torch.equal(reference._int_mm(a, small, weight_absmax=127).long(), exact) and len(calls) == 3  # split
    assert torch.equal(reference._int_mm(a, small, weight_absmax=14).long(), exact) and len(calls) == 4


def test_cpu_int8_kernel_measures_the_weight_at_load(monkeypatch):
    table = F.get_format("dint4-a")
    qw = F.quantize_two_level(torch.randn(40, 128, generator=torch.Generator().manual_seed(1)), table, 64)
    spec = W4A8LayerSpec(40, 128, 64, table, "per-token", F.TWO_LEVEL)
    kern = CpuInt8Kernel(spec)
    state = kern.prepare(qw.packed, qw.scales, quantized_weight_tensors("p", qw)["p.weight_group_mult"])
    w8 = qw.int8_expansion()[0]
    assert kern._weight_absmax == int(w8.abs().max()) > reference.SATURATION_SAFE_WEIGHT
    calls = _count_int_mm(monkeypatch)
    x = torch.randn(3, 128)
    assert torch.equal(kern.apply(state, x), reference.w4a8_linear_reference(x, qw))
    assert len(calls) == 2 * 2  # kernel and reference each split the K-wide GEMM in two
