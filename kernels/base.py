"""The kernel contract: what a W4A8 linear kernel is told (``W4A8LayerSpec``) and must provide.

Everything a kernel may need to know about a layer is in the spec, so callers never probe a kernel
class for optional attributes: every kernel is built as ``Cls(spec)``, prepares from the checkpoint
tensors, and applies with the same arguments. What differs between kernels is stated as class
attributes of the base class (``supports_absmax_reduce``). Activation quantization has one
implementation (``w4a8_dint.reference``); :meth:`W4A8LinearKernel.quantize_input` is the one call
site for kernels that quantize outside a custom op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from w4a8_dint.formats import FLOAT_SCALES, SCALE_SCHEMES, TWO_LEVEL, CodeTable, FormatError, QuantizedWeight, unpack_group_mult
from w4a8_dint.reference import quantize_activation_per_token, quantize_activation_static, row_absmax

# Reduces a row-parallel shard's per-token absmax ``[M, 1]`` over the tensor-parallel group.
AbsmaxReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class W4A8LayerSpec:
    """What a kernel needs to know about one quantized linear."""

    out_features: int  # N
    in_features: int  # K
    group_size: int  # effective group size of the weight's scales or multipliers (K for per channel)
    table: CodeTable
    act_mode: str  # "per-token" | "per-tensor"
    scale_scheme: str = FLOAT_SCALES  # "float" | "two-level" (formats.SCALE_SCHEMES)
    out_dtype: torch.dtype | None = None  # activation/output dtype the layer runs in; None: follows x
    has_bias: bool = False

    def __post_init__(self) -> None:
        if self.scale_scheme not in SCALE_SCHEMES:
            raise ValueError(f"scale_scheme must be one of {SCALE_SCHEMES}, got {self.scale_scheme!r}")

    @property
    def two_level(self) -> bool:
        return self.scale_scheme == TWO_LEVEL

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def epilogue_groups(self) -> int:
        """Float scales per output channel: 1 for per channel and two-level (one integer GEMM), else K / G."""
        return 1 if self.two_level else self.num_groups


class W4A8LinearKernel(ABC):
    """Lifecycle: ``kernel = Cls(spec)``; ``state = kernel.prepare(qweight, weight_scale, weight_group_mult)``
    once at load; ``kernel.apply(state, x, input_scale, smooth_scale, bias, absmax_reduce)`` per call."""

    name: ClassVar[str] = "abstract"
    # Whether apply() honours ``absmax_reduce`` (row-parallel TP shards quantizing with the whole row's
    # per-token scale). A caller with a reduce and a kernel without support must warn and drop it.
    supports_absmax_reduce: ClassVar[bool] = False

    def __init__(self, spec: W4A8LayerSpec) -> None:
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: W4A8LayerSpec, device: torch.device) -> tuple[bool, str | None]:
        """``(True, None)`` or ``(False, why not)``."""

    @abstractmethod
    def prepare(
        self, qweight: torch.Tensor, weight_scale: torch.Tensor, weight_group_mult: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Turn checkpoint tensors into what :meth:`apply` consumes (done once at load).

        ``weight_group_mult`` is the packed checkpoint tensor of two-level layers (None otherwise).
        """

    @abstractmethod
    def apply(
        self, state: dict[str, torch.Tensor], x: torch.Tensor, input_scale: torch.Tensor | None = None,
        smooth_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
        absmax_reduce: AbsmaxReduce | None = None,
    ) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""

    # -- shared helpers -------------------------------------------------------------------------
    def quantized_weight(
        self, qweight: torch.Tensor, weight_scale: torch.Tensor, weight_group_mult: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """The checkpoint tensors as a :class:`QuantizedWeight`, checked against the spec."""
        s = self.spec
        scale_shape = (s.out_features, s.epilogue_groups)
        if tuple(qweight.shape) != (s.out_features, s.in_features // 2) or tuple(weight_scale.shape) != scale_shape:
            raise ValueError(
                f"{self.name}: expected qweight {(s.out_features, s.in_features // 2)} and weight_scale {scale_shape}, "
                f"got {tuple(qweight.shape)} and {tuple(weight_scale.shape)}"
            )
        if s.two_level != (weight_group_mult is not None):
            raise ValueError(f"{self.name}: {s.scale_scheme} scales {'need' if s.two_level else 'take no'} weight_group_mult")
        mult = None
        if weight_group_mult is not None:
            try:
                mult = unpack_group_mult(weight_group_mult, s.num_groups)
            except FormatError as e:
                raise ValueError(f"{self.name}: {e}") from e
        return QuantizedWeight(qweight, weight_scale.float(), s.table, s.group_size, mult)

    def quantize_input(
        self, x: torch.Tensor, input_scale: torch.Tensor | None, smooth_scale: torch.Tensor | None,
        absmax_reduce: AbsmaxReduce | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [M, K]`` -> ``(q int8, scale float32 [M, 1])`` with the reference's quantizers (traceable)."""
        xf = x.float()
        if smooth_scale is not None:
            xf = xf / smooth_scale.float()
        if self.spec.act_mode == "per-tensor":
            if input_scale is None:
                raise ValueError(f"{self.name}: per-tensor activation mode needs a calibrated input_scale")
            return quantize_activation_static(xf, input_scale)  # checked finite and > 0 at load
        absmax = None if absmax_reduce is None else absmax_reduce(row_absmax(xf))
        return quantize_activation_per_token(xf, absmax)

    def refuse_absmax_reduce(self, absmax_reduce: AbsmaxReduce | None) -> None:
        if absmax_reduce is not None and not self.supports_absmax_reduce:
            raise ValueError(f"{self.name}: does not support absmax_reduce (supports_absmax_reduce is False)")
