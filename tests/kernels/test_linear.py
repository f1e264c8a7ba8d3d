"""Kernel selection and the CPU int8 kernel's bit-exactness against the reference."""

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.kernels.linear import CpuInt8Kernel, ReferenceKernel, W4A8LayerSpec, choose_kernel


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
