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

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from w4a8_dint.formats import CodeTable, QuantizedWeight, expand_to_int8
from w4a8_dint.reference import int_matmul_grouped, quantize_activation, w4a8_epilogue, w4a8_linear_reference

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
        return {
            "w8": expand_to_int8(qweight, self.spec.table).contiguous(),
            "half_scales": (weight_scale.float() * 0.5).contiguous(),
        }

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if smooth_scale is not None:
            x2 = x2 / smooth_scale.float()
        q_x, s_x = quantize_activation(x2, self.spec.act_mode, input_scale)
        acc = int_matmul_grouped(q_x, state["w8"], self.spec.group_size)
        y = w4a8_epilogue(acc, state["half_scales"], s_x)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


# Preference order; a GPU kernel registers itself in front (see kernels/triton_w4a8.py).
KERNELS: list[type[W4A8LinearKernel]] = [CpuInt8Kernel, ReferenceKernel]


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
