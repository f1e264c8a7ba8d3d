"""The ``quantization_config`` schema and checkpoint tensor names, in one place.

calibrate writes it, the HF and vLLM integrations read it. For every quantized
linear ``<prefix>`` (an ``nn.Linear`` module name, e.g.
``model.layers.0.self_attn.q_proj``) a checkpoint holds:

* ``<prefix>.qweight``       uint8   ``[N, K // 2]``  packed codes (see formats.py)
* ``<prefix>.weight_scale``  float32 ``[N, K // G]``  (``[N, 1]`` per channel, and for two-level scales)
* ``<prefix>.weight_group_mult`` uint8 ``[N, ceil(K // G / 2)]``  only for ``scale_scheme: "two-level"``:
  the integer group multipliers, 4 bits each (formats.pack_group_mult)
* ``<prefix>.input_scale``   float32 ``[1]``          only for ``per-tensor`` (static) layers
* ``<prefix>.smooth_scale``  float32 ``[K]``          only when the layer's smoothing vector could
  not be folded into the previous op; the layer divides its input by it
* ``<prefix>.bias``          as in the float model, when present
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .formats import (
    DEFAULT_FORMAT,
    FLOAT_SCALES,
    PER_CHANNEL,
    SCALE_SCHEMES,
    TWO_LEVEL,
    CodeTable,
    FormatError,
    QuantizedWeight,
    format_from_config,
    get_format,
    pack_group_mult,
    resolve_group_size,
    unpack_group_mult,
)
from .method_names import METHODS, ROUNDINGS
from .reference import ACT_MODES

QUANT_METHOD = "w4a8-dint"
CONFIG_VERSION = 1

QWEIGHT = "qweight"
WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
SMOOTH_SCALE = "smooth_scale"
WEIGHT_GROUP_MULT = "weight_group_mult"
BIAS = "bias"

DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head",)


class ConfigError(ValueError):
    """A quantization_config that is missing, malformed, or does not match the weights."""


@dataclass
class LayerPolicy:
    """What one quantized linear does at run time."""

    act_mode: str = "per-token"
    smooth: bool = False  # a <prefix>.smooth_scale tensor is present

    def __post_init__(self) -> None:
        if self.act_mode not in ACT_MODES:
            raise ConfigError(f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")


@dataclass
class W4A8Config:
    """A W4A8 scheme plus what calibration decided per layer (torchao-style typed config)."""

    format: str = DEFAULT_FORMAT
    group_size: int = PER_CHANNEL
    scale_scheme: str = FLOAT_SCALES  # "float" | "two-level" (formats.SCALE_SCHEMES); absent in old checkpoints
    act_mode: str = "per-token"  # for layers not listed in ``layers``
    layers: dict[str, LayerPolicy] = field(default_factory=dict)
    modules_to_not_convert: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_NOT_CONVERT))
    method: str = "rtn"
    rounding: str = "rtn"  # how weights were rounded onto the table (checkpoints before it existed: "rtn")
    calibration: dict[str, Any] = field(default_factory=dict)
    # Offline rotation folded into the weights before calibration (calibrate/rotate.py): method,
    # seed, what was rotated and folded, whether lm_head was untied. None: not rotated (old checkpoints).
    rotation: dict[str, Any] | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        get_format(self.format)
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ConfigError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")
        if self.act_mode not in ACT_MODES:
            raise ConfigError(f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        if self.scale_scheme not in SCALE_SCHEMES:
            raise ConfigError(f"scale_scheme must be one of {SCALE_SCHEMES}, got {self.scale_scheme!r}")
        if self.two_level and self.group_size == PER_CHANNEL:
            raise ConfigError("two-level scales need a group size (per channel already has one scale per row)")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rotation is not None and not isinstance(self.rotation, dict):
            raise ConfigError(f"rotation must be a dict or absent, got {type(self.rotation).__name__}")
        self.layers = {k: v if isinstance(v, LayerPolicy) else LayerPolicy(**v) for k, v in self.layers.items()}

    @property
    def table(self) -> CodeTable:
        return get_format(self.format)

    @property
    def two_level(self) -> bool:
        return self.scale_scheme == TWO_LEVEL

    def policy(self, prefix: str) -> LayerPolicy:
        return self.layers.get(prefix, LayerPolicy(act_mode=self.act_mode))

    def is_skipped(self, prefix: str) -> bool:
        """True for modules kept in float (exact name or a dotted suffix match, like HF)."""
        return any(prefix == m or prefix.endswith("." + m) or prefix.startswith(m + ".") for m in self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "format": self.table.to_config(),
            "bits": 4,
            "activation_bits": 8,
            "group_size": self.group_size,
            "scale_scheme": self.scale_scheme,
            "act_mode": self.act_mode,
            "layers": {k: asdict(v) for k, v in sorted(self.layers.items())},
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "method": self.method,
            "rounding": self.rounding,
            "calibration": dict(self.calibration),
            **({"rotation": dict(self.rotation)} if self.rotation is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "W4A8Config":
        if not isinstance(d, dict):
            raise ConfigError(f"quantization_config must be a dict, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"quant_method is {d.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = int(d.get("version", CONFIG_VERSION))
        if version > CONFIG_VERSION:
            raise ConfigError(f"quantization_config version {version} is newer than this w4a8-dint ({CONFIG_VERSION}); upgrade")
        fmt = d.get("format")
        if not isinstance(fmt, dict) or "name" not in fmt:
            raise ConfigError("quantization_config.format must be {'name': ..., 'values': [16 values]}")
        try:
            table = format_from_config(fmt)
        except FormatError as e:
            raise ConfigError(str(e)) from e
        try:
            return cls(
                format=table.name,
                group_size=int(d.get("group_size", PER_CHANNEL)),
                scale_scheme=d.get("scale_scheme", FLOAT_SCALES),
                act_mode=d.get("act_mode", "per-token"),
                layers={k: LayerPolicy(**v) for k, v in (d.get("layers") or {}).items()},
                modules_to_not_convert=list(d.get("modules_to_not_convert") or []),
                method=d.get("method", "rtn"),
                rounding=d.get("rounding", "rtn"),
                calibration=dict(d.get("calibration") or {}),
                rotation=d.get("rotation"),
                version=version,
            )
        except TypeError as e:
            raise ConfigError(f"malformed quantization_config: {e}") from e


def quantized_weight_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, Any]:
    """The checkpoint tensors of one quantized weight: qweight, weight_scale (+ weight_group_mult if two-level).

    The one writer of these names (calibrate and the benchmarks call it).
    """
    out = {f"{prefix}.{QWEIGHT}": qw.packed.cpu(), f"{prefix}.{WEIGHT_SCALE}": qw.scales.float().cpu()}
    if qw.group_mult is not None:
        out[f"{prefix}.{WEIGHT_GROUP_MULT}"] = pack_group_mult(qw.group_mult.cpu())
    return out


def read_quantized_weight(prefix: str, tensors: Any, qcfg: W4A8Config) -> QuantizedWeight:
    """Inverse of :func:`quantized_weight_tensors` (run the contract's checks first)."""
    packed = tensors[f"{prefix}.{QWEIGHT}"]
    k = packed.shape[1] * 2
    g = resolve_group_size(k, qcfg.group_size)
    mult = unpack_group_mult(tensors[f"{prefix}.{WEIGHT_GROUP_MULT}"], k // g) if qcfg.two_level else None
    return QuantizedWeight(packed, tensors[f"{prefix}.{WEIGHT_SCALE}"].float(), qcfg.table, g, mult)
