"""W4A8 linear kernels behind both integrations, chosen with a stated reason.

Like vLLM's kernel classes, each implementation says *why* it cannot run
(``can_implement -> (ok, reason)``), and :func:`choose_kernel` returns the first
that can together with the reasons the others were skipped, so callers log
which kernel runs. None of them ever falls back to 16-bit activations: the
activations are always quantized to INT8 and multiplied as integers.

Lifecycle: ``kernel = Cls(spec)``; ``state = kernel.prepare(qweight, weight_scale)``
once at load (e.g. expand codes to int8); ``kernel.apply(state, x, ...)`` per call.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from w4a8_dint.formats import CodeTable, QuantizedWeight, expand_to_int8
from w4a8_dint.kernels import ops as _ops  # noqa: F401  (registers torch.ops.w4a8_dint.*)
from w4a8_dint.reference import w4a8_linear_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class W4A8LayerSpec:
    """What a kernel needs to know about one quantized linear."""

    out_features: int  # N
    in_features: int  # K
    group_size: int  # effective group size (K for per channel)
    table: CodeTable
    act_mode: str  # "per-token" | "per-tensor"


class W4A8LinearKernel(ABC):
    name: str = "abstract"

    def __init__(self, spec: W4A8LayerSpec) -> None:
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: W4A8LayerSpec, device: torch.device) -> tuple[bool, str | None]:
        """``(True, None)`` or ``(False, why not)``."""

    @abstractmethod
    def prepare(self, qweight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Turn checkpoint tensors into what :meth:`apply` consumes (done once at load)."""

    @abstractmethod
    def apply(
        self, state: dict[str, torch.Tensor], x: torch.Tensor, input_scale: torch.Tensor | None = None,
        smooth_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""


class ReferenceKernel(W4A8LinearKernel):
    """The plain-torch ground truth (unpacks every call): always available, slow."""

    name = "reference"

    @classmethod
    def can_implement(cls, spec, device):
        return True, None

    def prepare(self, qweight, weight_scale):
        return {"qweight": qweight, "weight_scale": weight_scale}

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None):
        qw = QuantizedWeight(state["qweight"], state["weight_scale"], self.spec.table, self.spec.group_size)
        return w4a8_linear_reference(x, qw, self.spec.act_mode, input_scale, smooth_scale, bias)


class CpuInt8Kernel(W4A8LinearKernel):
    """CPU: codes expanded once to int8 (2 * value), then exact int8 x int8 -> int32 GEMMs.

    Same integer math and epilogue order as the reference, so outputs are bit-identical.
    Memory: the int8 expansion is 2x the packed weight (still half of bf16).
    """

    name = "cpu-int8"

    @classmethod
    def can_implement(cls, spec, device):
        if torch.device(device).type != "cpu":
            return False, f"runs on CPU tensors only (got {device})"
        return True, None

    def prepare(self, qweight, weight_scale):
        # Stored K-major ([K, N] storage viewed as [N, K]): every group slice w8[:, k0:k1].t() is then a
        # contiguous [G, N] block, which is what torch._int_mm wants, so no call copies the weight.
        return {
            "w8": expand_to_int8(qweight, self.spec.table).t().contiguous().t(),
            "half_scales": (weight_scale.float() * 0.5).contiguous(),
            "lut": self.spec.table.expansion_lut(qweight.device),
        }

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None):
        # Through the custom op (kernels/ops.py) so a torch.compile graph sees one opaque node.
        return torch.ops.w4a8_dint.w4a8_linear(
            x, state["w8"], state["half_scales"], state["lut"], self.spec.group_size, self.spec.act_mode,
            input_scale, smooth_scale, bias,
        )


class TritonW4A8Kernel(W4A8LinearKernel):
    """CUDA: Triton kernels on the packed 4-bit weight (kernels/triton_w4a8.py), via the custom op.

    Codes stay packed (4-bit bandwidth) and are decoded to int8 inside the GEMM through the
    format's 16-entry table; int8 x int8 -> int32 tensor-core dots; bit-identical to the reference.
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

    def prepare(self, qweight, weight_scale):
        return {
            "qweight": qweight.contiguous(),
            "half_scales": (weight_scale.float() * 0.5).contiguous(),
            "lut": self.spec.table.expansion_lut(qweight.device),
        }

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None):
        return torch.ops.w4a8_dint.w4a8_linear(
            x, state["qweight"], state["half_scales"], state["lut"], self.spec.group_size, self.spec.act_mode,
            input_scale, smooth_scale, bias,
        )


# Preference order: the GPU kernel first (it says why it cannot run elsewhere), then CPU, then the reference.
KERNELS: list[type[W4A8LinearKernel]] = [TritonW4A8Kernel, CpuInt8Kernel, ReferenceKernel]


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
