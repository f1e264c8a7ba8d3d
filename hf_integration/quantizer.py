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
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from w4a8_dint.config import QUANT_METHOD, ConfigError, W4A8Config
from w4a8_dint.contract import CheckpointError, check, quantized_linears, structure_from_model

logger = logging.getLogger(__name__)


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


# -- checkpoint checks (before any weight is loaded): the contract, against the live model ---------------
# transformers itself would load a wrong-shaped or wrong-dtype tensor into a quantized module without
# complaint (its shape check is off when a quantizer is active) and random-init anything missing, so the
# whole checkpoint contract (w4a8_dint.contract.check) runs first, with the structure read off this model.


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
        from w4a8_dint.hf_integration.modules import replace_linears

        qcfg = self.quantization_config.w4a8
        structure = structure_from_model(model)  # float modules include the class's _keep_in_fp32_modules
        prefixes = quantized_linears(structure, qcfg)  # the contract's rule: every linear not listed as float
        if not prefixes:
            raise CheckpointError("w4a8-dint: no nn.Linear left to quantize after modules_to_not_convert")
        if checkpoint_files:
            check(Path(checkpoint_files[0]).parent, structure)
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
