"""W4A8 linear kernels behind both integrations, chosen with a stated reason.

Like vLLM's kernel classes, each implementation says *why* it cannot run
(``can_implement -> (ok, reason)``), and :func:`choose_kernel` returns the first
that can together with the reasons the others were skipped, so callers log
which kernel runs. None of them ever falls back to 16-bit activations: the
activations are always quantized to INT8 and multiplied as integers.

The contract (``W4A8LayerSpec``, ``W4A8LinearKernel``) is in ``kernels/base.py``;
the kernel list :data:`KERNELS` is static (nothing registers into it at import).
Lifecycle: ``kernel = Cls(spec)``; ``state = kernel.prepare(qweight, weight_scale,
weight_group_mult)`` once at load (e.g. expand codes to int8); ``kernel.apply(state, x, ...)``
per call.

Two-level scales (formats.py) make every kernel run ONE integer GEMM per layer: the
CPU kernels fold the group multiplier into the int8 expansion (``2v * m``) at load,
the Triton kernel multiplies the decoded codes by ``m`` in registers; all apply the
per-channel scale ``s / 2`` once.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from w4a8_dint.formats import QuantizedWeight
from w4a8_dint.kernels import ops as _ops  # noqa: F401  (registers torch.ops.w4a8_dint.*)
from w4a8_dint.kernels.base import AbsmaxReduce, W4A8LayerSpec, W4A8LinearKernel
from w4a8_dint.kernels.cpu_onednn import OneDnnInt8Kernel
from w4a8_dint.kernels.cpu_packed import CpuPackedKernel
from w4a8_dint.reference import w4a8_linear_reference

__all__ = ["KERNELS", "AbsmaxReduce", "CpuInt8Kernel", "CpuPackedKernel", "OneDnnInt8Kernel", "ReferenceKernel", "TritonW4A8Kernel",
           "W4A8LayerSpec", "W4A8LinearKernel", "choose_kernel"]

logger = logging.getLogger(__name__)


class ReferenceKernel(W4A8LinearKernel):
    """The plain-torch ground truth (unpacks every call): always available, slow."""

    name = "reference"

    @classmethod
    def can_implement(cls, spec, device):
        return True, None

    def prepare(self, qweight, weight_scale, weight_group_mult=None):
        qw = self.quantized_weight(qweight, weight_scale, weight_group_mult)
        state = {"qweight": qw.packed, "weight_scale": qw.scales}
        if qw.group_mult is not None:
            state["group_mult"] = qw.group_mult
        return state

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce=None):
        self.refuse_absmax_reduce(absmax_reduce)
        qw = QuantizedWeight(state["qweight"], state["weight_scale"], self.spec.table, self.spec.group_size,
                             state.get("group_mult"))
        return w4a8_linear_reference(x, qw, self.spec.act_mode, input_scale, smooth_scale, bias)


class CpuInt8Kernel(W4A8LinearKernel):
    """CPU: codes expanded once to int8 (2 * value, times m for two-level), then exact int8 x int8 -> int32 GEMMs.

    Same integer math and epilogue order as the reference, so outputs are bit-identical.
    Per-channel and two-level layers are one ``torch._int_mm`` per call; float group
    scales need one per group. Memory: the int8 expansion is 2x the packed weight (half of bf16).
    """

    name = "cpu-int8"

    def __init__(self, spec: W4A8LayerSpec) -> None:
        super().__init__(spec)
        self._weight_absmax: int | None = None  # max |w8|, measured once at load (reference._int_mm's split)

    @classmethod
    def can_implement(cls, spec, device):
        if torch.device(device).type != "cpu":
            return False, f"runs on CPU tensors only (got {device})"
        return True, None

    def prepare(self, qweight, weight_scale, weight_group_mult=None):
        w8, half_scales = self.quantized_weight(qweight, weight_scale, weight_group_mult).int8_expansion()
        self._weight_absmax = int(w8.abs().amax()) if w8.numel() else 0
        # Stored K-major ([K, N] storage viewed as [N, K]): every group slice w8[:, k0:k1].t() is then a
        # contiguous [G, N] block, which is what torch._int_mm wants, so no call copies the weight.
        return {
            "w8": w8.t().contiguous().t(),
            "half_scales": half_scales.contiguous(),  # [N, 1] for per-channel and two-level
            "lut": self.spec.table.expansion_lut(qweight.device),
        }

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce=None):
        self.refuse_absmax_reduce(absmax_reduce)
        # Through the custom op (kernels/ops.py) so a torch.compile graph sees one opaque node.
        epilogue_group = self.spec.in_features // self.spec.epilogue_groups
        return torch.ops.w4a8_dint.w4a8_linear(
            x, state["w8"], state["half_scales"], state["lut"], epilogue_group, self.spec.act_mode,
            input_scale, smooth_scale, bias, None, self._weight_absmax,
        )


class TritonW4A8Kernel(W4A8LinearKernel):
    """CUDA: Triton kernels on the packed 4-bit weight (kernels/triton_w4a8.py), via the custom op.

    Codes stay packed (4-bit bandwidth) and are decoded to int8 inside the GEMM through the
    format's 16-entry table (times the group multiplier for two-level scales); int8 x int8 -> int32
    tensor-core dots; bit-identical to the reference.
    """

    name = "triton-w4a8"

    @classmethod
    def can_implement(cls, spec, device):
        if torch.device(device).type != "cuda":
            return False, f"needs a CUDA device (got {device})"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        from w4a8_dint.kernels.triton_w4a8 import unsupported_reason

        why = unsupported_reason(spec.in_features, spec.group_size)
        return (why is None), why

    def prepare(self, qweight, weight_scale, weight_group_mult=None):
        qw = self.quantized_weight(qweight, weight_scale, weight_group_mult)
        state = {
            "qweight": qw.packed.contiguous(),
            "half_scales": (qw.scales * 0.5).contiguous(),  # [N, 1] for two-level: per-channel epilogue
            "lut": self.spec.table.expansion_lut(qweight.device),
        }
        if qw.group_mult is not None:
            state["group_mult"] = qw.group_mult.to(qweight.device).contiguous()  # uint8 [N, K // G]
        return state

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce=None):
        self.refuse_absmax_reduce(absmax_reduce)
        return torch.ops.w4a8_dint.w4a8_linear(
            x, state["qweight"], state["half_scales"], state["lut"], self.spec.group_size, self.spec.act_mode,
            input_scale, smooth_scale, bias, state.get("group_mult"),
        )


# Preference order: the GPU kernel first (it says why it cannot run elsewhere), then vLLM-CPU's oneDNN
# (only where vLLM is loaded), the 4-bit-resident CPU kernel, the plain-torch CPU kernel, and the reference.
# cpu-packed sits after onednn-int8: at decode (M <= 8) it is 0.9-1.6x oneDNN's AMX GEMM on the loaded box, but
# prefill (M >= 256) is 0.3-0.8x, and vLLM prefills. It sits before cpu-int8: 4-7x faster at decode (torch._int_mm
# repacks the int8 weight every call), similar at prefill, half the weight memory; per-channel and two-level
# layers only (float group scales fall through). Numbers: benchmarks/results/kernel_bench_cpu_packed.json.
KERNELS: tuple[type[W4A8LinearKernel], ...] = (
    TritonW4A8Kernel, OneDnnInt8Kernel, CpuPackedKernel, CpuInt8Kernel, ReferenceKernel,
)


def choose_kernel(
    spec: W4A8LayerSpec, device: torch.device | str, prefer: str | None = None
) -> tuple[type[W4A8LinearKernel], list[str]]:
    """First kernel that can run ``spec`` on ``device`` (or the one named ``prefer``), plus why others were skipped."""
    device = torch.device(device)
    skipped: list[str] = []
    candidates = [k for k in KERNELS if prefer is None or k.name == prefer]
    if not candidates:
        raise ValueError(f"unknown kernel {prefer!r}; known: {[k.name for k in KERNELS]}")
    for k in candidates:
        ok, why = k.can_implement(spec, device)
        if ok:
            return k, skipped
        skipped.append(f"{k.name}: {why}")
    raise RuntimeError(f"no W4A8 kernel can run {spec} on {device}: " + "; ".join(skipped))
