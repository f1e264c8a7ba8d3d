"""MACs per token of a model, by linear-layer kind, and what they cost on each MAC unit.

The linear layers come from the model itself (built on the meta device from its
config: no weights read, any architecture transformers knows), so nothing here is
LLaMA-specific. A layer kind is the module's last name (``q_proj``, ``down_proj``,
``lm_head``). Which layers run W4A8 comes from the checkpoint's quantization_config
(layers with a ``qweight``); for a float model, from the default skip list
(``lm_head`` stays in float, as calibrate does).

Attention's two activation x activation matmuls (QK^T and PV) are not W4A8 in any
scheme; they are counted at ``context`` tokens and costed on the FP16 unit, so the
whole-model line shows how much the linear-layer saving is diluted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from w4a8_dint.config import DEFAULT_MODULES_TO_NOT_CONVERT

DEFAULT_CONTEXT = 512
ATTENTION_KIND = "attention (QK, PV)"


@dataclass(frozen=True)
class KindMacs:
    kind: str
    macs_per_token: int  # summed over all layers of this kind
    modules: int
    quantized: bool  # runs on the W4A8 / W8A8 unit (else stays FP16)


@dataclass(frozen=True)
class ModelMacs:
    name: str
    kinds: tuple[KindMacs, ...]
    attention_macs_per_token: int
    context: int

    @property
    def linear_macs(self) -> int:
        return sum(k.macs_per_token for k in self.kinds)


def _read_config(model_dir: Path) -> dict:
    from w4a8_dint.contract import read_hf_config  # the one config reader (errors name the file)

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    return read_hf_config(model_dir)


def _quantized_prefixes(model_dir: Path, cfg: dict) -> set[str] | None:
    """Prefixes with a qweight in a w4a8-dint checkpoint; None for a float model."""
    if (cfg.get("quantization_config") or {}).get("quant_method") != "w4a8-dint":
        return None
    from w4a8_dint.checkpoint import quantized_prefixes, shard_files

    return set(quantized_prefixes(list(shard_files(model_dir))))


def model_macs(model_dir: str | Path | None = None, context: int = DEFAULT_CONTEXT) -> ModelMacs:
    """MACs per generated token at ``context`` tokens of context."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from w4a8_dint.embedded import resolve_model

    path = resolve_model(None if model_dir is None else str(model_dir))
    if not isinstance(path, Path):
        raise FileNotFoundError(f"{model_dir}: not a local model directory (no Hub access here)")
    raw = _read_config(path)
    quantized = _quantized_prefixes(path, raw)
    cfg = {k: v for k, v in raw.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}/config.json has no model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    agg: dict[str, list[int]] = {}
    flags: dict[str, bool] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        kind = name.rsplit(".", 1)[-1]
        if quantized is None:
            q = not any(name == m or name.endswith("." + m) for m in DEFAULT_MODULES_TO_NOT_CONVERT)
        else:
            q = name in quantized
        a = agg.setdefault(kind, [0, 0])
        a[0] += mod.in_features * mod.out_features
        a[1] += 1
        flags[kind] = flags.get(kind, q) and q  # a kind counts as quantized only if all its modules are
    kinds = tuple(KindMacs(k, v[0], v[1], flags[k]) for k, v in agg.items())
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // heads if heads else 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    attention = 2 * heads * head_dim * context * layers
    return ModelMacs(str(raw.get("_name_or_path") or path.name), kinds, attention, context)


@dataclass(frozen=True)
class Scheme:
    name: str
    unit: str | None  # design key of the unit quantized linears run on (None: everything FP16)


def scheme_energy(macs: ModelMacs, scheme: Scheme, energy_of, fp16: str) -> dict[str, float]:
    """Energy per token by kind: ``energy_of(design, kind) -> energy per MAC``."""
    out = {}
    for k in macs.kinds:
        design = scheme.unit if (scheme.unit and k.quantized) else fp16
        out[k.kind] = k.macs_per_token * energy_of(design, k.kind)
    out[ATTENTION_KIND] = macs.attention_macs_per_token * energy_of(fp16, None)
    return out
