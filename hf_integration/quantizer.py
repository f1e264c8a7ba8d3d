"""transformers integration: ``W4A8DintConfig`` + ``W4A8DintHfQuantizer``, registered as ``"w4a8-dint"``.

``register()`` is idempotent. Users normally never call it: the ``.pth`` import
hook (``autoregister.py``) calls it as soon as ``transformers.quantizers.auto``
is imported, so a plain ``AutoModelForCausalLM.from_pretrained(dir)`` works
without importing this package.

Import discipline: this module runs *while* transformers is importing
``modeling_utils`` (the hook fires from inside that import), so at module
level it may import only ``transformers.quantizers.auto``/``base`` and
``transformers.utils.quantization_config`` (complete by then), never
``transformers.modeling_utils`` or the top-level ``transformers`` namespace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from w4a8_dint.checkpoint import CheckpointError, check_layer_tensors
from w4a8_dint.config import (
    BIAS,
    INPUT_SCALE,
    QUANT_METHOD,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_SCALE,
    ConfigError,
    W4A8Config,
)

logger = logging.getLogger(__name__)

QUANT_TENSOR_SUFFIXES = (QWEIGHT, WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE)


class W4A8DintConfig(QuantizationConfigMixin):
    """transformers-facing wrapper around :class:`w4a8_dint.config.W4A8Config`.

    ``to_dict()`` returns exactly the dict ``W4A8Config.to_dict()`` writes (plus any
    keys a newer writer added), so ``save_pretrained`` round-trips config.json.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("quant_method", QUANT_METHOD)
        try:
            self.w4a8 = W4A8Config.from_dict(kwargs)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"invalid w4a8-dint quantization_config: {e}") from e
        known = set(self.w4a8.to_dict())
        # Keys this version does not interpret are kept verbatim so a save does not drop them.
        self.extra = {k: v for k, v in kwargs.items() if k not in known}
        self.quant_method = QUANT_METHOD

    # Convenience views (what users inspect on model.config.quantization_config).
    @property
    def format(self) -> str:
        return self.w4a8.format

    @property
    def group_size(self) -> int:
        return self.w4a8.group_size

    @property
    def act_mode(self) -> str:
        return self.w4a8.act_mode

    @property
    def modules_to_not_convert(self) -> list[str]:
        return self.w4a8.modules_to_not_convert

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, **self.w4a8.to_dict()}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, W4A8DintConfig) and self.to_dict() == other.to_dict()


# -- checkpoint checks (before any weight is loaded) -------------------------------------------

@dataclass(frozen=True)
class TensorHeader:
    """dtype/shape of a checkpoint tensor, from the safetensors header (no data read)."""

    dtype: str  # safetensors spelling: "U8", "F32", ...
    shape: tuple[int, ...]
    file: str


def read_headers(files: list[str]) -> dict[str, TensorHeader]:
    """Tensor headers of every shard; a missing, truncated or corrupt shard raises :class:`CheckpointError`."""
    from safetensors import safe_open

    out: dict[str, TensorHeader] = {}
    for path in files:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: missing shard (named in the safetensors index but not on disk)")
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: w4a8-dint checkpoints are safetensors only (no pickle weights)")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = TensorHeader(sl.get_dtype(), tuple(sl.get_shape()), str(path))
        except Exception as e:  # SafetensorError / OSError on truncation and corruption
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return out


def load_small_tensors(headers: dict[str, TensorHeader], names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named (small: scales) tensors, opening each shard once."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(headers[n].file, []).append(n)
    out = {}
    for file, ns in by_file.items():
        with safe_open(file, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in ns})
    return out


def check_checkpoint_against_model(
    model: torch.nn.Module, headers: dict[str, TensorHeader], prefixes: list[str], qcfg: W4A8Config, where: str,
) -> None:
    """Raise :class:`CheckpointError` naming the first disagreement between the config, the model and the weights.

    transformers itself would load a wrong-shaped or wrong-dtype tensor into a quantized
    module without complaint (its shape check is off when a quantizer is active), and
    random-init anything missing, so every quantized layer is checked here first.
    """
    quantized = set(prefixes)
    small = load_small_tensors(headers, [
        f"{p}.{s}" for p in prefixes for s in (WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE) if f"{p}.{s}" in headers
    ])
    for prefix in prefixes:
        lin = model.get_submodule(prefix)
        h = headers.get(f"{prefix}.{QWEIGHT}")
        if h is None:
            has_float = f"{prefix}.weight" in headers
            raise CheckpointError(
                f"{where}: quantization_config says {prefix} is quantized, but the checkpoint has no "
                f"{prefix}.{QWEIGHT}" + (" (it has a float weight: add it to modules_to_not_convert?)" if has_float else "")
            )
        if h.dtype != "U8":
            raise CheckpointError(f"{where}: {prefix}.{QWEIGHT} must be uint8 (U8), got {h.dtype}")
        want = (lin.out_features, lin.in_features // 2)
        if h.shape != want:
            raise CheckpointError(
                f"{where}: {prefix}.{QWEIGHT} has shape {list(h.shape)}, the model's layer needs {list(want)} "
                f"(out_features={lin.out_features}, in_features={lin.in_features})"
            )
        if f"{prefix}.weight" in headers:
            raise CheckpointError(f"{where}: {prefix} has both a float weight and {QWEIGHT}")
        if f"{prefix}.{INPUT_SCALE}" in headers and qcfg.policy(prefix).act_mode != "per-tensor":
            raise CheckpointError(f"{where}: {prefix} has an {INPUT_SCALE} but the config says act_mode=per-token")
        # check_layer_tensors needs qweight's dtype and shape only: a meta tensor spares reading the bulk.
        tensors = {f"{prefix}.{QWEIGHT}": torch.empty(h.shape, dtype=torch.uint8, device="meta")}
        tensors.update({n: small[n] for s in (WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE) if (n := f"{prefix}.{s}") in small})
        try:
            check_layer_tensors(prefix, tensors, qcfg)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        bias = headers.get(f"{prefix}.{BIAS}")
        if (bias is not None) != (lin.bias is not None):
            raise CheckpointError(f"{where}: {prefix}.{BIAS} is {'present' if bias else 'missing'} but the model's layer "
                                  f"{'has no' if bias else 'has a'} bias")
    stray = sorted({
        n.rsplit(".", 1)[0] for n in headers
        if n.rsplit(".", 1)[-1] in QUANT_TENSOR_SUFFIXES and n.rsplit(".", 1)[0] not in quantized
    })
    if stray:
        raise CheckpointError(
            f"{where}: quantized tensors for modules that are not converted (skipped by modules_to_not_convert, "
            f"or not nn.Linear in this model): {stray[:5]}"
        )
    unknown = sorted(set(qcfg.layers) - quantized)
    if unknown:
        raise CheckpointError(f"{where}: quantization_config.layers names layers the model does not quantize: {unknown[:5]}")
    _check_float_tensors(model, headers, quantized, where)


def _check_float_tensors(model: torch.nn.Module, headers: dict[str, TensorHeader], quantized: set[str], where: str) -> None:
    """Every other persistent model tensor must be in the checkpoint: no random init behind the user's back."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [
        k for k in model.state_dict()
        if k not in headers and k not in tied and k.rsplit(".", 1)[0] not in quantized
    ]
    if missing:
        raise CheckpointError(
            f"{where}: tensors missing from the checkpoint (would be randomly initialised): "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )


# -- the quantizer ------------------------------------------------------------------------------

class W4A8DintHfQuantizer(HfQuantizer):
    """Loads pre-quantized w4a8-dint checkpoints (quantizing on the fly is the calibrator's job)."""

    requires_calibration = True

    def __init__(self, quantization_config: W4A8DintConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.converted: list[str] = []  # names of the swapped nn.Linear modules
        self.kernels: dict[str, int] = {}  # kernel name -> number of layers using it (after loading)

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and {"disk"} & set(map(str, device_map.values())):
            raise ValueError("w4a8-dint does not support disk offload (device_map with 'disk')")

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs: Any):
        from w4a8_dint.hf_integration.modules import linear_prefixes, replace_linears

        qcfg = self.quantization_config.w4a8
        keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        skip_list = self.get_modules_to_not_convert(model, qcfg.modules_to_not_convert, keep_fp32)
        # Same matching rule as everywhere else (exact name, dotted prefix or suffix): W4A8Config.is_skipped.
        prefixes = linear_prefixes(model, W4A8Config(modules_to_not_convert=skip_list).is_skipped)
        if not prefixes:
            raise CheckpointError("w4a8-dint: no nn.Linear left to quantize after modules_to_not_convert")
        if checkpoint_files:
            where = str(Path(checkpoint_files[0]).parent)
            check_checkpoint_against_model(model, read_headers(checkpoint_files), prefixes, qcfg, where)
        replace_linears(model, prefixes, qcfg)
        self.converted = prefixes
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from w4a8_dint.hf_integration.modules import prepare_kernels

        # Build every kernel's state now (int8 expansion on CPU) so the first forward is not the slow one,
        # and log once which kernel runs and why the others were skipped.
        self.kernels = prepare_kernels(model)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# -- registration -------------------------------------------------------------------------------

def register() -> None:
    """Register config + quantizer as ``"w4a8-dint"``; idempotent, and replaces a refusal stub left by a failed attempt."""
    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, W4A8DintConfig), (AUTO_QUANTIZER_MAPPING, W4A8DintHfQuantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and not getattr(current, "w4a8_dint_refusal", False):
            logger.warning("w4a8-dint: replacing %r registered for %r", current, QUANT_METHOD)
        # Direct assignment: transformers' register_* decorators raise on a second registration,
        # which is exactly the re-import / failed-first-attempt case to tolerate.
        mapping[QUANT_METHOD] = cls


register()  # importing this module registers, like transformers' own decorator-registered quantizers
