"""The checkpoint contract: one reader, one config reader, one ``check`` holding every rule.

calibrate (before its atomic rename), ``w4a8 validate``, ``w4a8 push``, the HF quantizer and the
vLLM front end all call :func:`check`; the loaders keep only what needs live modules. A
checkpoint that passes here loads in both loaders; one that fails is refused with a message
that names the file or tensor and the problem.

Reading is header-only: safetensors headers are parsed here (8-byte little-endian length + JSON),
so a truncated, corrupt or missing shard, an index pointing at a missing file and a tensor held by
two shards are found without reading the weights. Only the small per-layer tensors that carry
values (scales) are read in full.

The rules, checked against the model's architecture (built on the ``meta`` device from
config.json, nothing downloaded, ``trust_remote_code`` off unless asked):

* every linear the model has, outside ``modules_to_not_convert``, has exactly the tensors of
  :data:`TENSOR_RULES` with the dtype and shape its (out, in) features and the group size give;
  per-layer tensors (``input_scale``, ``smooth_scale``) are present exactly when the layer's policy
  asks for them;
* parts that vLLM fuses into one GEMM (:data:`FUSED_PARTS`) agree: all quantized or all float,
  one activation policy, one ``input_scale`` and ``smooth_scale`` value (they share one input);
* modules that must stay float (:func:`float_modules`: the input and output embeddings and every
  linear outside the decoder layers) are covered by ``modules_to_not_convert`` and hold no
  quantized tensor; nothing listed there is quantized;
* every parameter the model needs is present with its shape (tied weights may be absent);
* scales are finite and inside :data:`SCALE_BOUNDS`.

To add a per-layer tensor (say a second-level scale), add one :class:`TensorRule` to
:data:`TENSOR_RULES`; every caller picks it up.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import (
    BIAS,
    INPUT_SCALE,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_GROUP_MULT,
    WEIGHT_SCALE,
    ConfigError,
    LayerPolicy,
    W4A8Config,
)
from .formats import FormatError, check_group_mult, resolve_group_size, unpack_group_mult

SAFE_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit; a larger length field means a corrupt file

# safetensors dtype spelling <-> torch dtype (what checkpoints can hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or breaks the contract; the message names file/tensor and problem."""


# -- the header-only reader -------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorHeader:
    """dtype/shape of a checkpoint tensor, from the safetensors header (no data read)."""

    dtype: str  # safetensors spelling: "U8", "F32", ...
    shape: tuple[int, ...]
    file: str  # path of the shard holding it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Parse one file's header; a missing, truncated or corrupt file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {n} "
                                      f"does not fit the file's {size} bytes)")
            raw = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, TensorHeader] = {}
    data_end = 0
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r} ({e})") from e
        if dtype not in SAFETENSORS_DTYPES or end < begin:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r} ({info})")
        header = TensorHeader(dtype, shape, str(path))
        if end - begin != header.numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} {dtype} {list(shape)} "
                                  f"does not fit its {end - begin} data bytes")
        out[name] = header
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + data_end})")
    return out


def weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single file (headers read for the latter)."""
    d = Path(model_dir)
    index = d / SAFE_INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from e
        missing = sorted({f for f in wmap.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that are not on disk (missing shard): {missing}")
        return dict(wmap)
    single = d / SINGLE_FILE
    if not single.is_file():
        if not d.is_dir():
            raise CheckpointError(f"{model_dir}: not a directory")
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise CheckpointError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; w4a8-dint reads safetensors only")
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {SAFE_INDEX}")
    return {k: SINGLE_FILE for k in read_safetensors_header(single)}


def read_headers(model_dir: str | os.PathLike) -> dict[str, TensorHeader]:
    """Every tensor's header; each shard read once. Refuses duplicates across shards and index/file disagreement."""
    d = Path(model_dir)
    wmap = weight_map(d)
    out: dict[str, TensorHeader] = {}
    for fname in sorted(set(wmap.values())):
        for name, h in read_safetensors_header(d / fname).items():
            if name in out:
                raise CheckpointError(f"{model_dir}: tensor {name} is in two shards: {Path(out[name].file).name} and {fname}")
            out[name] = h
    for name, fname in wmap.items():
        if name not in out:
            raise CheckpointError(f"{d / SAFE_INDEX}: says {name} is in {fname}, but that file does not hold it")
        if Path(out[name].file).name != fname:
            raise CheckpointError(f"{d / SAFE_INDEX}: says {name} is in {fname}, but it is in {Path(out[name].file).name}")
    return out


def read_tensors(model_dir: str | os.PathLike, names: Iterable[str] | None = None,
                 headers: Mapping[str, TensorHeader] | None = None) -> dict[str, torch.Tensor]:
    """Load (some of) a checkpoint's tensors, opening each shard once; errors name the file and tensor."""
    from safetensors import safe_open

    headers = read_headers(model_dir) if headers is None else headers
    wanted = list(headers) if names is None else list(names)
    missing = [n for n in wanted if n not in headers]
    if missing:
        raise CheckpointError(f"{model_dir}: tensors missing from checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for n in wanted:
        by_file.setdefault(headers[n].file, []).append(n)
    out: dict[str, torch.Tensor] = {}
    for file, ns in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        except Exception as e:  # SafetensorError / OSError on truncation and corruption
            raise CheckpointError(f"{file}: cannot read tensor data (truncated or corrupt?): {e}") from e
    return out


# -- the config reader --------------------------------------------------------------------------------

def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json as a dict; a missing or malformed file raises :class:`CheckpointError` naming it."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def parse_qconfig(hf_config: Mapping[str, Any], where: str) -> W4A8Config:
    if "quantization_config" not in hf_config:
        raise CheckpointError(f"{where}: config.json has no quantization_config (not a w4a8-dint checkpoint)")
    try:
        return W4A8Config.from_dict(hf_config["quantization_config"])
    except (ConfigError, FormatError) as e:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: {e}") from e


def read_checkpoint_config(model_dir: str | os.PathLike) -> tuple[dict[str, Any], W4A8Config]:
    """``(hf config dict, W4A8Config)`` of a w4a8-dint checkpoint."""
    cfg = read_hf_config(model_dir)
    return cfg, parse_qconfig(cfg, str(model_dir))


# -- the per-layer tensor table -----------------------------------------------------------------------

# Bounds on scale values (float32). Why these numbers:
# * weight_scale in [0, 1e4]: zero is what absmax scaling writes for an all-zero group (decodes to exact
#   zeros); 1e4 lets a weight reach 7e4, already past fp16's 65504 and >100x any weight of the LLMs we
#   calibrate (SmolLM2-135M: max |w| < 30), so a larger scale is a corrupt or mis-scaled checkpoint.
# * input_scale in [float32 smallest normal, 1e4]: the layer divides by it (a denormal overflows 1/s to inf);
#   1e4 means activations up to 1.27e6, orders beyond the largest "massive activations" reported (~1e4).
# * smooth_scale in [1e-4, 1e4]: the calibrator clamps smoothing vectors to exactly this range
#   (calibrate/search.py); the layer divides its input by it.
F32_TINY = float(torch.finfo(torch.float32).tiny)
SCALE_BOUNDS: dict[str, tuple[float, float]] = {
    WEIGHT_SCALE: (0.0, 1e4),
    INPUT_SCALE: (F32_TINY, 1e4),
    SMOOTH_SCALE: (1e-4, 1e4),
}


@dataclass(frozen=True)
class LayerDims:
    """What one quantized linear's tensor shapes depend on."""

    out_features: int
    in_features: int
    group: int  # effective group size (never -1)


ValueCheck = Callable[[str, torch.Tensor, LayerDims, W4A8Config], None]


def _two_level(qcfg: W4A8Config) -> bool:
    return bool(getattr(qcfg, "two_level", False))


def bounded(suffix: str) -> ValueCheck:
    """Scale sanity for ``suffix``: finite and inside :data:`SCALE_BOUNDS`."""
    lo, hi = SCALE_BOUNDS[suffix]

    def check_values(name: str, t: torch.Tensor, dims: LayerDims, qcfg: W4A8Config) -> None:
        t = t.float()
        bad = ~torch.isfinite(t)
        if bad.any():
            raise CheckpointError(f"{name}: {int(bad.sum())} non-finite value(s) (NaN/Inf)")
        # Python scalars compare in the tensor's float32 (a bound of 1e-4 admits float32(1e-4)), and make no
        # tensor on the default device (transformers builds models under a meta default device).
        low = t < lo
        if low.any():
            raise CheckpointError(f"{name}: {int(low.sum())} value(s) below {lo:g} (smallest {float(t.min()):g}); "
                                  f"{suffix} must be >= {lo:g}")
        high = t > hi
        if high.any():
            raise CheckpointError(f"{name}: {int(high.sum())} value(s) above the bound {hi:g} (largest "
                                  f"{float(t.max()):g}); a corrupt or mis-scaled checkpoint")

    return check_values


def _group_mult_values(name: str, t: torch.Tensor, dims: LayerDims, qcfg: W4A8Config) -> None:
    try:
        check_group_mult(unpack_group_mult(t, dims.in_features // dims.group), qcfg.table)
    except FormatError as e:
        raise CheckpointError(f"{name}: {e}") from e


@dataclass(frozen=True)
class TensorRule:
    """One per-layer tensor ``<prefix>.<suffix>``: dtype, accepted shapes, when it must exist, value check."""

    suffix: str
    dtypes: tuple[str, ...]
    shapes: Callable[[LayerDims, W4A8Config], tuple[tuple[int, ...], ...]]
    wanted: Callable[[W4A8Config, LayerPolicy], bool]
    when: str  # says when it is wanted, for messages
    values: ValueCheck | None = None  # reads the tensor's data (None: header only)
    shared_by_fused_parts: bool = False  # fused parts read one input: their copies must be equal


TENSOR_RULES: tuple[TensorRule, ...] = (
    TensorRule(QWEIGHT, ("U8",), lambda d, q: ((d.out_features, d.in_features // 2),),
               lambda q, p: True, "every quantized layer"),
    TensorRule(WEIGHT_SCALE, ("F32",),
               lambda d, q: ((d.out_features, 1 if _two_level(q) else d.in_features // d.group),),
               lambda q, p: True, "every quantized layer", bounded(WEIGHT_SCALE)),
    TensorRule(WEIGHT_GROUP_MULT, ("U8",),
               lambda d, q: ((d.out_features, (d.in_features // d.group + 1) // 2),),
               lambda q, p: _two_level(q), "scale_scheme 'two-level' only", _group_mult_values),
    TensorRule(INPUT_SCALE, ("F32",), lambda d, q: ((1,), ()),
               lambda q, p: p.act_mode == "per-tensor", "per-tensor (static) layers only",
               bounded(INPUT_SCALE), shared_by_fused_parts=True),
    TensorRule(SMOOTH_SCALE, ("F32",), lambda d, q: ((d.in_features,),),
               lambda q, p: p.smooth, "layers with smooth=true only", bounded(SMOOTH_SCALE),
               shared_by_fused_parts=True),
)
RULES_BY_SUFFIX = {r.suffix: r for r in TENSOR_RULES}
QUANT_SUFFIXES = tuple(RULES_BY_SUFFIX)
VALUE_SUFFIXES = tuple(r.suffix for r in TENSOR_RULES if r.values is not None)
# HF module names vLLM fuses into one GEMM (its packed_modules_mapping), as siblings of one parent.
FUSED_PARTS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                            ("query", "key", "value"))


def layer_dims(prefix: str, out_features: int, in_features: int, qcfg: W4A8Config) -> LayerDims:
    try:
        return LayerDims(out_features, in_features, resolve_group_size(in_features, qcfg.group_size))
    except FormatError as e:
        raise CheckpointError(f"{prefix}: {e}") from e


def check_tensor_meta(name: str, rule: TensorRule, dtype: str, shape: tuple[int, ...], dims: LayerDims,
                      qcfg: W4A8Config) -> None:
    """dtype and shape of one per-layer tensor (the loaders call this too, on live tensors)."""
    shapes = rule.shapes(dims, qcfg)
    if dtype not in rule.dtypes or tuple(shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise CheckpointError(
            f"{name}: expected {'/'.join(rule.dtypes)} {want} for the layer's out_features={dims.out_features}, "
            f"in_features={dims.in_features}, group_size={qcfg.group_size}; got {dtype} {list(shape)}"
        )


def check_tensor_values(name: str, rule: TensorRule, t: torch.Tensor, dims: LayerDims, qcfg: W4A8Config) -> None:
    """The rule's value check (scale sanity, multiplier range); meta tensors carry no values to check."""
    if rule.values is not None and t.device.type != "meta":
        rule.values(name, t, dims, qcfg)


def check_loaded_tensor(name: str, suffix: str, t: torch.Tensor, dims: LayerDims, qcfg: W4A8Config) -> None:
    """One live tensor against the table (vLLM's weight loader calls this for tensors it loads)."""
    rule = RULES_BY_SUFFIX[suffix]
    check_tensor_meta(name, rule, _TORCH_TO_SAFETENSORS.get(t.dtype, str(t.dtype)), tuple(t.shape), dims, qcfg)
    check_tensor_values(name, rule, t, dims, qcfg)


# -- the model's structure ----------------------------------------------------------------------------

@dataclass
class ModelStructure:
    """What the architecture says a checkpoint must hold (model names, as transformers builds the model)."""

    linears: dict[str, tuple[int, int, bool]]  # name -> (out_features, in_features, has_bias)
    params: dict[str, tuple[int, ...]]  # every parameter the model loads, tied copies excluded
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter -> the one it shares storage with
    float_modules: dict[str, str] = field(default_factory=dict)  # module -> why it must stay float
    decoder_layers: str = ""  # e.g. "model.layers"
    rename: Callable[[str], str] | None = None  # checkpoint name -> model name (transformers' key renamings)

    def model_name(self, checkpoint_name: str) -> str:
        return self.rename(checkpoint_name) if self.rename else checkpoint_name


def _find_decoder_layers(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = int(getattr(text, "num_hidden_layers", 0) or 0)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and n > 0 and len(m) == n and all(list(b.parameters()) for b in m):
            return name
    return ""


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def float_modules(model: torch.nn.Module, decoder_layers: str | None = None) -> dict[str, str]:
    """Modules no loader quantizes, with the reason: embeddings, output head, every linear outside the decoder."""
    layers = _find_decoder_layers(model) if decoder_layers is None else decoder_layers
    out: dict[str, str] = {}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    for getter, why in ((get_in, "the model's input embedding"), (get_out, "the model's output embedding")):
        try:
            name = _module_name(model, getter() if getter else None)
        except NotImplementedError:
            name = None
        if name:
            out[name] = why
    keep_fp32 = W4A8Config(modules_to_not_convert=list(getattr(model, "_keep_in_fp32_modules", None) or []))
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name in out:
            continue
        if not (layers and name.startswith(layers + ".")):
            out[name] = f"a linear outside the decoder layers ({layers or 'none found'})"
        elif keep_fp32.is_skipped(name):
            out[name] = "kept in float32 by the model class (_keep_in_fp32_modules)"
    return out


def _renamer(model: torch.nn.Module) -> Callable[[str], str] | None:
    """transformers' checkpoint-key renamings for this model (e.g. GPT-NeoX ``embed_out.`` -> ``lm_head.``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # older/newer transformers without this API: names are used as they are
        return None
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


def structure_from_model(model: torch.nn.Module) -> ModelStructure:
    """Read the structure off a built model (meta or real); used by the HF quantizer and calibrate."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False) if n not in tied}
    linears = {n: (m.out_features, m.in_features, m.bias is not None)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = _find_decoder_layers(model)
    return ModelStructure(linears, params, tied, float_modules(model, layers), layers, _renamer(model))


def structure_from_config(hf_config: Mapping[str, Any], trust_remote_code: bool = False,
                          where: str = "") -> ModelStructure:
    """Build the model on ``meta`` from config.json (nothing downloaded, no weights) and read its structure."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = dict(hf_config)
    cfg.pop("quantization_config", None)  # the float architecture; no quantizer involved
    model_type = cfg.get("model_type")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(cfg)
    except Exception as e:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: cannot build a transformers config for model_type "
                              f"{model_type!r}: {e}") from e
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: cannot build the {model_type!r} architecture as a causal LM "
                              f"to check the checkpoint against ({type(e).__name__}: {e})") from e
    return structure_from_model(model)


# -- check ---------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What :func:`check` reads: the directory, its config and every tensor's header."""

    path: Path
    hf_config: dict[str, Any]
    qconfig: W4A8Config
    headers: dict[str, TensorHeader]

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> "Checkpoint":
        hf_config, qcfg = read_checkpoint_config(model_dir)
        return cls(Path(model_dir), hf_config, qcfg, read_headers(model_dir))


def check(checkpoint: str | os.PathLike | Checkpoint, model_structure: ModelStructure | None = None,
          trust_remote_code: bool = False) -> dict[str, Any]:
    """Apply every rule; raise :class:`CheckpointError` naming the first problem. Returns a small report."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.read(checkpoint)
    where, qcfg = str(ck.path), ck.qconfig
    structure = model_structure or structure_from_config(ck.hf_config, trust_remote_code, where)

    by_model: dict[str, str] = {}  # model name -> checkpoint name
    for name in ck.headers:
        by_model[structure.model_name(name)] = name

    def has(model_name: str) -> bool:
        return model_name in by_model

    def header(model_name: str) -> TensorHeader:
        return ck.headers[by_model[model_name]]

    quantized = _check_module_coverage(where, structure, qcfg, by_model)
    if not quantized:
        raise CheckpointError(f"{where}: quantization_config present but no *.{QWEIGHT} tensors")
    unknown = sorted(set(qcfg.layers) - set(quantized))
    if unknown:
        raise CheckpointError(f"{where}: quantization_config.layers names layers that are not quantized linears "
                              f"of this model: {unknown[:5]}")
    dims_of: dict[str, LayerDims] = {}
    for prefix in quantized:
        out_f, in_f, has_bias = structure.linears[prefix]
        dims = dims_of[prefix] = layer_dims(prefix, out_f, in_f, qcfg)
        policy = qcfg.policy(prefix)
        for rule in TENSOR_RULES:
            model_name = f"{prefix}.{rule.suffix}"
            if not rule.wanted(qcfg, policy):
                if has(model_name):
                    raise CheckpointError(f"{by_model[model_name]}: present, but {rule.suffix} belongs to "
                                          f"{rule.when} and the config says {prefix} has act_mode="
                                          f"{policy.act_mode!r}, smooth={policy.smooth}")
                continue
            if not has(model_name):
                raise CheckpointError(f"{prefix}: {rule.suffix} missing (needed by {rule.when}; "
                                      f"act_mode={policy.act_mode!r}, smooth={policy.smooth})")
            h = header(model_name)
            check_tensor_meta(by_model[model_name], rule, h.dtype, h.shape, dims, qcfg)
        if has(f"{prefix}.weight"):
            raise CheckpointError(f"{by_model[prefix + '.weight']}: a float weight for {prefix}, which is quantized "
                                  f"(it has {QWEIGHT}); add it to modules_to_not_convert or drop one")
        bias = f"{prefix}.{BIAS}"
        if has(bias) != has_bias:
            raise CheckpointError(f"{prefix}.{BIAS}: {'present' if has(bias) else 'missing'} but the model's layer "
                                  f"{'has no' if not has_bias else 'has a'} bias")
    _check_float_tensors(where, structure, set(quantized), by_model, ck.headers)
    values = read_tensors(ck.path, [by_model[f"{p}.{s}"] for p in quantized for s in VALUE_SUFFIXES
                                    if has(f"{p}.{s}")], ck.headers)
    values = {structure.model_name(k): v for k, v in values.items()}
    for name, t in values.items():
        prefix, _, suffix = name.rpartition(".")
        check_tensor_values(by_model[name], RULES_BY_SUFFIX[suffix], t, dims_of[prefix], qcfg)
    _check_fused_parts(structure, qcfg, set(quantized), values)
    policies = [qcfg.policy(p) for p in quantized]
    return {"layers": len(quantized), "tensors": len(ck.headers), "format": qcfg.format,
            "group_size": qcfg.group_size, "per_tensor": sum(p.act_mode == "per-tensor" for p in policies),
            "smooth": sum(p.smooth for p in policies)}


def quantized_linears(structure: ModelStructure, qcfg: W4A8Config) -> list[str]:
    """The model's linears a loader converts: every one not matched by modules_to_not_convert."""
    return [n for n in structure.linears if not qcfg.is_skipped(n)]


def _check_module_coverage(where: str, structure: ModelStructure, qcfg: W4A8Config,
                           by_model: Mapping[str, str]) -> list[str]:
    """Which linears are quantized; refuses float-only modules that are quantized or not listed as float."""
    for name, why in structure.float_modules.items():
        if any(f"{name}.{s}" in by_model for s in QUANT_SUFFIXES):
            s = next(s for s in QUANT_SUFFIXES if f"{name}.{s}" in by_model)
            listed = " while it is in modules_to_not_convert" if qcfg.is_skipped(name) else ""
            raise CheckpointError(f"{by_model[f'{name}.{s}']}: {name} is quantized{listed}, but it is {why} and "
                                  f"must stay float (no loader converts it)")
    uncovered = {n: why for n, why in structure.float_modules.items()
                 if n in structure.linears and not qcfg.is_skipped(n)}
    if uncovered:
        names = ", ".join(f"{n} ({why})" for n, why in uncovered.items())
        raise CheckpointError(
            f"{where}: modules_to_not_convert {qcfg.modules_to_not_convert} does not name {names}, which stay "
            f"float; loaders would expect {next(iter(uncovered))}.{QWEIGHT} (add {sorted(uncovered)} to "
            "modules_to_not_convert)")
    quantized = quantized_linears(structure, qcfg)
    qset = set(quantized)
    def qweight_first(item: tuple[str, str]) -> tuple[str, int]:
        module, _, suffix = item[0].rpartition(".")
        return module, QUANT_SUFFIXES.index(suffix) if suffix in QUANT_SUFFIXES else len(QUANT_SUFFIXES)

    for model_name, ck_name in sorted(by_model.items(), key=qweight_first):
        module, _, suffix = model_name.rpartition(".")
        if suffix not in QUANT_SUFFIXES or module in qset:
            continue
        if module in structure.linears:
            raise CheckpointError(f"{ck_name}: {module} is quantized in the checkpoint but listed in "
                                  f"modules_to_not_convert {qcfg.modules_to_not_convert}")
        raise CheckpointError(f"{ck_name}: the model has no nn.Linear {module} (this architecture's linears are "
                              f"e.g. {list(structure.linears)[:3]})")
    for prefix in quantized:
        if f"{prefix}.{QWEIGHT}" not in by_model:
            hint = " (it has a float weight: add it to modules_to_not_convert?)" if f"{prefix}.weight" in by_model else ""
            raise CheckpointError(f"{where}: quantization_config says {prefix} is quantized (not in "
                                  f"modules_to_not_convert), but the checkpoint has no {prefix}.{QWEIGHT}{hint}")
    return quantized


def _check_float_tensors(where: str, structure: ModelStructure, quantized: set[str], by_model: Mapping[str, str],
                         headers: Mapping[str, TensorHeader]) -> None:
    """Every other parameter the model needs is present, float, with the model's shape."""
    missing = []
    for name, shape in structure.params.items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            continue  # replaced by qweight + scales
        if name not in by_model:
            missing.append(name)
            continue
        h = headers[by_model[name]]
        if h.dtype not in _FLOAT_DTYPES or h.shape != shape:
            raise CheckpointError(f"{by_model[name]}: expected a float tensor {list(shape)} (the model's {name}), "
                                  f"got {h.dtype} {list(h.shape)}")
    if missing:
        raise CheckpointError(f"{where}: tensors missing from the checkpoint (loaders would randomly initialise "
                              f"them): {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _check_fused_parts(structure: ModelStructure, qcfg: W4A8Config, quantized: set[str],
                       values: Mapping[str, torch.Tensor]) -> None:
    """Siblings vLLM runs as one GEMM on one quantized input must agree on everything input-side."""
    for parent in sorted({n.rpartition(".")[0] for n in structure.linears}):
        for group in FUSED_PARTS:
            parts = [f"{parent}.{p}" if parent else p for p in group]
            if not all(p in structure.linears for p in parts):
                continue
            if len({p in quantized for p in parts}) > 1:
                raise CheckpointError(f"{parts}: fused into one GEMM by vLLM, but modules_to_not_convert keeps only "
                                      f"some of them float ({[p for p in parts if p not in quantized]})")
            if parts[0] not in quantized:
                continue
            policies = {p: qcfg.policy(p) for p in parts}
            if len({(pol.act_mode, pol.smooth) for pol in policies.values()}) > 1:
                detail = ", ".join(f"{p}: act_mode={pol.act_mode!r} smooth={pol.smooth}" for p, pol in policies.items())
                raise CheckpointError(f"{parts}: fused into one GEMM with one activation quantization, but their "
                                      f"policies differ ({detail})")
            for rule in TENSOR_RULES:
                copies = [values.get(f"{p}.{rule.suffix}") for p in parts]
                if not rule.shared_by_fused_parts or any(c is None for c in copies):
                    continue
                if not all(torch.equal(copies[0].reshape(-1), c.reshape(-1)) for c in copies[1:]):
                    raise CheckpointError(f"{parts}: {rule.suffix} differs between the fused parts; they share one "
                                          "input, so they must share it (calibrate them together)")
