"""``W4A8Linear``: the ``nn.Linear`` replacement HF models run with, and the swap itself.

The module's buffer names are the checkpoint tensor names (``qweight``,
``weight_scale``, ``weight_group_mult`` for two-level scales, ``input_scale``,
``smooth_scale``, ``bias``; see
``w4a8_dint.config``), so transformers loads a checkpoint into it with no
weight-conversion ops, and ``save_pretrained`` writes the same tensors back.

The forward never dequantizes: it runs the W4A8 kernel that
``w4a8_dint.kernels.linear.choose_kernel`` picks for the device (Triton on CUDA,
the exact CPU int8 path on CPU), which quantizes activations to INT8 and does
integer GEMMs bit-identical to ``reference.w4a8_linear_reference``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import nn

from w4a8_dint.config import (
    BIAS,
    INPUT_SCALE,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_GROUP_MULT,
    WEIGHT_SCALE,
    LayerPolicy,
    W4A8Config,
)
from w4a8_dint.formats import FLOAT_SCALES, TWO_LEVEL, CodeTable, packed_group_mult_shape, resolve_group_size

logger = logging.getLogger(__name__)

# Quantization tensors that must stay float32 whatever dtype the model is cast to:
# rounding a scale to bf16 would change every output of the integer path.
FP32_TENSORS = (WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE)


class W4A8Linear(nn.Module):
    """A linear layer holding a packed 4-bit weight; INT8 activations, integer GEMM.

    Tensors are registered as (persistent) buffers: they are loaded and saved like
    parameters but are never trainable, and the float ones stay float32 under
    ``model.to(dtype)`` (see :meth:`_apply`).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, table: CodeTable, group_size: int,
        policy: LayerPolicy, bias_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        scale_scheme: str = FLOAT_SCALES,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features must be even to pack two 4-bit codes per byte, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.table = table
        self.group_size = resolve_group_size(in_features, group_size)  # effective (K for per channel)
        self.act_mode = policy.act_mode
        self.scale_scheme = scale_scheme
        two_level = scale_scheme == TWO_LEVEL
        n_groups = in_features // self.group_size
        self.register_buffer(QWEIGHT, torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(WEIGHT_SCALE, torch.empty(out_features, 1 if two_level else n_groups,
                                                       dtype=torch.float32, device=device))
        self.register_buffer(WEIGHT_GROUP_MULT, torch.empty(
            packed_group_mult_shape(out_features, n_groups), dtype=torch.uint8, device=device) if two_level else None)
        self.register_buffer(
            INPUT_SCALE, torch.empty(1, dtype=torch.float32, device=device) if policy.act_mode == "per-tensor" else None
        )
        self.register_buffer(
            SMOOTH_SCALE, torch.empty(in_features, dtype=torch.float32, device=device) if policy.smooth else None
        )
        self.register_buffer(BIAS, torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._kernel = None
        self._state: dict[str, torch.Tensor] | None = None
        self._state_key: tuple | None = None

    # -- kernel -------------------------------------------------------------------------------
    @property
    def spec(self):
        from w4a8_dint.kernels.linear import W4A8LayerSpec

        return W4A8LayerSpec(self.out_features, self.in_features, self.group_size, self.table, self.act_mode,
                             self.scale_scheme, has_bias=self.bias is not None)

    @property
    def kernel_name(self) -> str | None:
        return None if self._kernel is None else self._kernel.name

    def prepare_kernel(self, prefer: str | None = None) -> list[str]:
        """Pick the kernel for the buffers' device and build its state; returns why others were skipped."""
        from w4a8_dint.kernels.linear import choose_kernel

        kernel_cls, skipped = choose_kernel(self.spec, self.qweight.device, prefer=prefer)
        self._kernel = kernel_cls(self.spec)
        self._state = self._kernel.prepare(self.qweight, self.weight_scale, self.weight_group_mult)
        self._state_key = self._source_key()
        return skipped

    def _source_key(self) -> tuple:
        """Identity of the tensors the kernel state was built from: device, object, in-place version."""
        return tuple((t.device, id(t), t._version) for t in (self.qweight, self.weight_scale, self.weight_group_mult)
                     if t is not None)

    def release_kernel(self) -> None:
        self._kernel, self._state, self._state_key = None, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._state is None or self._state_key != self._source_key():
            # First call, or the weights moved device / were replaced or overwritten (load_state_dict)
            # since the state was built: a stale int8 expansion would silently give wrong outputs.
            skipped = self.prepare_kernel()
            logger.debug("W4A8Linear on %s: kernel %s (skipped: %s)", self.qweight.device, self.kernel_name, skipped)
        if x.device != self.qweight.device:
            raise RuntimeError(f"input on {x.device} but the W4A8 weight is on {self.qweight.device}")
        return self._kernel.apply(self._state, x, self.input_scale, self.smooth_scale, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every float buffer; our scales must stay float32 (bit-exactness),
        # so keep their float32 values and only follow the device change.
        saved = {name: t for name in FP32_TENSORS if (t := getattr(self, name)) is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)
        self.release_kernel()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.table.name}, group_size={self.group_size}, scale_scheme={self.scale_scheme}, "
            f"act_mode={self.act_mode}, "
            f"smooth={self.smooth_scale is not None}, kernel={self.kernel_name}"
        )


# -- model surgery ----------------------------------------------------------------------------

def linear_prefixes(model: nn.Module, skip: Callable[[str], bool]) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantize (all but the skipped ones)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(name)]


def replace_linears(model: nn.Module, prefixes: Iterable[str], qcfg: W4A8Config) -> int:
    """Swap each named ``nn.Linear`` for a :class:`W4A8Linear` on the same device; returns the count."""
    table = qcfg.table
    count = 0
    for name in prefixes:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = W4A8Linear(
            old.in_features, old.out_features, old.bias is not None, table, qcfg.group_size, qcfg.policy(name),
            bias_dtype=None if old.bias is None else old.bias.dtype, device=old.weight.device,
            scale_scheme=qcfg.scale_scheme,
        )
        setattr(parent, child, new)
        count += 1
    return count


def w4a8_modules(model: nn.Module) -> dict[str, W4A8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, W4A8Linear)}


def prepare_kernels(model: nn.Module, prefer: str | None = None) -> dict[str, int]:
    """Build every layer's kernel state once (after weights are loaded); log which kernel runs and why.

    Returns ``{kernel name: number of layers}``.
    """
    used: Counter[str] = Counter()
    skipped_reasons: Counter[str] = Counter()
    for m in w4a8_modules(model).values():
        for why in m.prepare_kernel(prefer=prefer):
            skipped_reasons[why] += 1
        used[m.kernel_name] += 1
    if used:
        skipped = "; ".join(f"{why} ({n} layers)" for why, n in skipped_reasons.items()) or "none"
        logger.info("w4a8-dint: kernels %s; skipped: %s", dict(used), skipped)
    return dict(used)
