"""The oneDNN (vLLM-CPU) W4A8 kernel: bit-exact with the reference on real SmolLM2 weights and activations."""

from __future__ import annotations

import gc

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.kernels import linear as kernel_registry
from w4a8_dint.kernels.linear import CpuInt8Kernel, ReferenceKernel, W4A8LayerSpec, choose_kernel
from w4a8_dint.reference import quantize_activation_per_tensor, quantize_activation_per_token

cpu_kernel = pytest.importorskip("w4a8_dint.vllm_w4a8.cpu_kernel")
if not cpu_kernel.onednn_int8_available()[0]:
    pytest.skip(f"vLLM-CPU oneDNN ops unavailable: {cpu_kernel.onednn_int8_available()[1]}", allow_module_level=True)
OneDnnInt8Kernel = cpu_kernel.OneDnnInt8Kernel


def _run(kernel_cls, spec, qw, x, input_scale, smooth, bias, **kw):
    kernel = kernel_cls(spec, **kw)
    return kernel.apply(kernel.prepare(qw.packed, qw.scales), x, input_scale, smooth, bias)


@pytest.mark.parametrize("fmt", ["dint4-a", "dint4-b", "int4", "fp4"])
@pytest.mark.parametrize("group", [F.PER_CHANNEL, 64])
@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_reference_on_real_layers(real_layer_io, fmt, group, act_mode, dtype):
    table = F.get_format(fmt)
    for prefix, (w, x_all) in real_layer_io.items():
        n, k = w.shape
        qw = F.quantize_weight(w, table, group)
        spec = W4A8LayerSpec(n, k, qw.group_size, table, act_mode)
        # A static scale a bit below the observed range, so some values saturate as in deployment.
        input_scale = torch.tensor([float(x_all.abs().max()) / 127 * 0.8]) if act_mode == "per-tensor" else None
        smooth = x_all.abs().amax(0).clamp(min=1e-2).sqrt()
        bias = torch.linspace(-1, 1, n)
        for m in (1, x_all.shape[0]):
            x = x_all[:m].to(dtype)
            for sm, b in ((None, None), (smooth, bias)):
                ref = _run(ReferenceKernel, spec, qw, x, input_scale, sm, b)
                got = _run(OneDnnInt8Kernel, spec, qw, x, input_scale, sm, b, out_dtype=dtype, has_bias=b is not None)
                assert got.dtype == dtype
                assert torch.equal(got, ref), f"{prefix} M={m} smooth={sm is not None}: {(got.float() - ref.float()).abs().max()}"


def test_static_quantizer_is_the_reference_without_the_graph_break(real_layer_io):
    _, x = real_layer_io["model.layers.5.mlp.down_proj"]
    s = torch.tensor([float(x.abs().max()) / 127 * 0.5])
    q, scale = cpu_kernel.quantize_activation_static(x, s)
    q_ref, scale_ref = quantize_activation_per_tensor(x, s)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert int(q.abs().max()) == 127  # saturated, as the reference does


def test_tp_absmax_reduce_recovers_full_row_quantization(real_layer_io):
    """Row-parallel ranks each see half of K; with the all-gathered absmax they quantize exactly like TP=1."""
    _, x = real_layer_io["model.layers.5.mlp.down_proj"]
    q_full, s_full = quantize_activation_per_token(x)
    halves = x.chunk(2, dim=-1)
    row_max = torch.stack([h.abs().amax(-1, keepdim=True) for h in halves], -1).amax(-1)
    parts = [cpu_kernel.quantize_activation_with_absmax_reduce(h, lambda _local: row_max) for h in halves]
    assert torch.equal(torch.cat([p[0] for p in parts], -1), q_full)
    assert all(torch.equal(p[1], s_full) for p in parts)
    # Without the reduce each half would get its own (different) scale:
    assert not torch.equal(quantize_activation_per_token(halves[0])[1], s_full)


def test_registered_in_front_of_the_generic_cpu_kernel():
    cpu_kernel.register()
    cpu_kernel.register()  # idempotent
    kernels = kernel_registry.KERNELS
    assert kernels.count(OneDnnInt8Kernel) == 1
    assert kernels.index(OneDnnInt8Kernel) < kernels.index(CpuInt8Kernel)
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
    kernel = OneDnnInt8Kernel(W4A8LayerSpec(*w.shape, w.shape[1], table, "per-token"), out_dtype=torch.bfloat16)
    state = kernel.prepare(qw.packed, qw.scales)
    with pytest.raises(ValueError, match="prepared for torch.bfloat16 activations"):
        kernel.apply(state, x.float())
