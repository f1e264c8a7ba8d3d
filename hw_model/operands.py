"""Operand streams for the power model: real ones from a model run on real text, and uniform random ones.

Real operands, per linear-layer type (``q_proj``, ``down_proj``, ...):

* weights: the codes the unit would hold -- ``formats.quantize_weight`` codes of the float
  weight (per output channel), or the checkpoint's own ``qweight`` codes when ``--model`` is a
  w4a8-dint checkpoint in that format; int8 per-channel codes for INT8 x INT8; fp16 bits for FP16;
* activations: the layer's real input from a forward pass over calibration text, INT8-quantized
  exactly as the reference does it (per token, or per tensor with the checkpoint's ``input_scale``,
  after dividing by ``smooth_scale``); the raw input as fp16 for the FP16 unit.

Dataflow: output-stationary. Each lane is one output ``y[m, n]``; cycle ``t`` feeds
``(w[n, k0 + t], x[m, k0 + t])`` and ``first`` opens the dot product at ``t = 0``. Lanes
are the same ``(layer, m, n, k0)`` draws for every unit, so units see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from w4a8_dint import formats as F
from w4a8_dint.hw_model.units import UnitSpec
from w4a8_dint.reference import quantize_activation_per_tensor, quantize_activation_per_token

DEFAULT_TEXT = "c4"
DEFAULT_TOKENS = 256
INT8_MAX = 127


class OperandError(ValueError):
    pass


@dataclass
class LayerSample:
    """One linear layer's float weight and real input, plus what a checkpoint says about it."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    weight: torch.Tensor  # float32 [N, K], the effective float weight (smoothing folded back)
    x: torch.Tensor  # float32 [M, K], the layer's input in the float model
    smooth: torch.Tensor | None = None  # [K]; the quantized layer sees x / smooth
    input_scale: torch.Tensor | None = None  # per-tensor static activation scale, if any
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # format name -> uint8 [N, K]
    operands: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # activation port arrays, computed once

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


# -- weight / activation integer operands -------------------------------------------------------

def int8_weight_codes(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 weights (the W8A8 baseline's operands)."""
    s = w.abs().amax(dim=1, keepdim=True).float() / INT8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w.float() / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def table_codes(sample: LayerSample, table: F.CodeTable, rows: np.ndarray | None = None) -> torch.Tensor:
    """Codes ``uint8 [rows, K]`` for a table: the checkpoint's when it used that table, else RTN per
    channel (per-channel quantization treats rows independently, so only the rows asked for are done)."""
    rows_t = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if table.name in sample.codes:
        c = sample.codes[table.name]
        return c if rows_t is None else c[rows_t]
    w = sample.weight if rows_t is None else sample.weight[rows_t]
    if sample.smooth is not None:
        w = w * sample.smooth
    return F.unpack_codes(F.quantize_weight(w.float(), table, F.PER_CHANNEL).packed)


def int8_activations(sample: LayerSample) -> torch.Tensor:
    x = sample.x / sample.smooth if sample.smooth is not None else sample.x
    if sample.input_scale is not None:
        return quantize_activation_per_tensor(x, sample.input_scale)[0]
    return quantize_activation_per_token(x)[0]


def weight_operands(spec: UnitSpec, sample: LayerSample, rows: np.ndarray | None = None) -> np.ndarray:
    """What the unit's ``w`` port sees for the layer's weights ``[rows, K]`` (all rows by default), as raw bits."""
    rows_t = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    w = sample.weight if rows_t is None else sample.weight[rows_t]
    if spec.style == "fp":
        return (w.to(torch.float16).view(torch.int16).numpy().astype(np.int64)) & 0xFFFF
    if spec.weight == "int8":  # W8A8 sees the same smoothed problem as W4A8: (x / s) @ (W * s)
        if sample.smooth is not None:
            w = w * sample.smooth
        return int8_weight_codes(w).numpy().astype(np.int64) & 0xFF
    table = F.get_format("int4" if spec.style == "native" else spec.weight)
    return table_codes(sample, table, rows).numpy().astype(np.int64)


def activation_operands(spec: UnitSpec, sample: LayerSample) -> np.ndarray:
    """What the unit's ``a`` port sees for every ``[M, K]`` input of the layer."""
    key = "a:fp16" if spec.style == "fp" else "a:int8"
    if key not in sample.operands:
        if spec.style == "fp":
            sample.operands[key] = sample.x.to(torch.float16).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
        else:
            sample.operands[key] = int8_activations(sample).numpy().astype(np.int64)
    return sample.operands[key]


# -- lanes ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lanes:
    """Which dot products the simulated lanes compute: sample index, token m, output n, start k0."""

    sample: np.ndarray
    m: np.ndarray
    n: np.ndarray
    k0: np.ndarray
    cycles: int

    @property
    def count(self) -> int:
        return len(self.m)


def draw_lanes(samples: list[LayerSample], lanes: int, cycles: int, seed: int) -> Lanes:
    if not samples:
        raise OperandError("no layer samples to draw lanes from")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(samples), lanes)
    ms, ns, ks = [], [], []
    for i in idx:
        s = samples[i]
        k = s.weight.shape[1]
        if cycles > k:
            raise OperandError(f"{s.name}: {cycles} cycles per dot product exceed K={k}")
        ms.append(rng.integers(0, s.x.shape[0]))
        ns.append(rng.integers(0, s.weight.shape[0]))
        ks.append(rng.integers(0, k - cycles + 1))
    return Lanes(idx, np.array(ms), np.array(ns), np.array(ks), cycles)


def real_streams(spec: UnitSpec, samples: list[LayerSample], lanes: Lanes) -> dict[str, np.ndarray]:
    """``{"w", "a", "first"}`` as ``[cycles, lanes]`` arrays for this unit."""
    t = np.arange(lanes.cycles)
    w = np.empty((lanes.cycles, lanes.count), dtype=np.int64)
    a = np.empty_like(w)
    for si in np.unique(lanes.sample):
        s = samples[int(si)]
        js = np.nonzero(lanes.sample == si)[0]
        rows, row_of = np.unique(lanes.n[js], return_inverse=True)
        w_rows = weight_operands(spec, s, rows)  # only the output channels the lanes use
        acts = activation_operands(spec, s)
        for j, r in zip(js, row_of):
            ks = lanes.k0[j] + t
            w[:, j] = w_rows[r, ks]
            a[:, j] = acts[lanes.m[j], ks]
    return _with_first(spec, w, a)


def random_streams(spec: UnitSpec, lanes: int, cycles: int, seed: int) -> dict[str, np.ndarray]:
    """Uniform random operands: codes 0..15 / int8 in [-127, 127]; fp16 of N(0, 1) samples."""
    rng = np.random.default_rng(seed)
    shape = (cycles, lanes)
    if spec.style == "fp":
        w = rng.standard_normal(shape).astype(np.float16).view(np.int16).astype(np.int64) & 0xFFFF
        a = rng.standard_normal(shape).astype(np.float16).view(np.int16).astype(np.int64) & 0xFFFF
    else:
        w = rng.integers(0, 1 << spec.weight_bits, shape)
        a = rng.integers(-INT8_MAX, INT8_MAX + 1, shape)
    return _with_first(spec, w, a)


def _with_first(spec: UnitSpec, w: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    out = {"w": w, "a": a}
    if spec.accumulate:
        first = np.zeros(w.shape, dtype=np.int64)
        first[0] = 1
        out["first"] = first
    return out


# -- real layer inputs from a model ------------------------------------------------------------

def _decoder_layer_indices(num_layers: int, how_many: int) -> list[int]:
    if how_many >= num_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / max(1, how_many - 1)) for i in range(how_many)})


def _is_w4a8_checkpoint(model_dir: Path) -> bool:
    from w4a8_dint.contract import read_hf_config  # the one config reader (errors name the file)

    q = read_hf_config(model_dir).get("quantization_config") or {}
    return q.get("quant_method") == "w4a8-dint"


def _float_model_from_checkpoint(model_dir: Path):
    """Rebuild a float model from a w4a8-dint checkpoint: ``W = dequant(codes) / smooth`` (so the
    float layer applied to x equals the quantized layer applied to x / smooth)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from w4a8_dint.checkpoint import load_tensors, quantized_prefixes, read_config, read_qconfig
    from w4a8_dint.config import INPUT_SCALE, QWEIGHT, SMOOTH_SCALE, WEIGHT_SCALE

    raw = read_config(model_dir)
    qcfg = read_qconfig(model_dir)
    cfg_dict = {k: v for k, v in raw.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise OperandError(f"{model_dir}/config.json has no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    tensors = load_tensors(model_dir)
    state: dict[str, torch.Tensor] = {}
    extras: dict[str, dict] = {}
    for prefix in quantized_prefixes(tensors):
        codes = F.unpack_codes(tensors[f"{prefix}.{QWEIGHT}"])
        w = F.dequantize_codes(codes, tensors[f"{prefix}.{WEIGHT_SCALE}"], qcfg.table, qcfg.group_size)
        smooth = tensors.get(f"{prefix}.{SMOOTH_SCALE}")
        state[f"{prefix}.weight"] = w / smooth.float() if smooth is not None else w
        inp = tensors.get(f"{prefix}.{INPUT_SCALE}") if qcfg.policy(prefix).act_mode == "per-tensor" else None
        extras[prefix] = {"codes": {qcfg.table.name: codes}, "smooth": smooth, "input_scale": inp}
    aux = (QWEIGHT, WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE)
    for name, t in tensors.items():
        if not name.endswith(tuple("." + s for s in aux)):
            state[name] = t.float() if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied and "rotary" not in k]
    if missing:
        raise OperandError(f"{model_dir}: checkpoint lacks weights for {missing[:5]}")
    if tied:
        model.tie_weights()
    return model, extras


def load_float_model(model_dir: str | Path | None):
    """``(model, tokenizer, extras)`` for a float HF dir, a w4a8-dint checkpoint, or None (embedded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w4a8_dint.embedded import resolve_model

    path = resolve_model(None if model_dir is None else str(model_dir))
    if not isinstance(path, Path) or not (path / "config.json").is_file():
        raise OperandError(f"{model_dir}: not a local model directory with config.json (no Hub access here)")
    tok = AutoTokenizer.from_pretrained(path)
    if _is_w4a8_checkpoint(path):
        model, extras = _float_model_from_checkpoint(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        extras = {}
    model.eval()
    return model, tok, extras


@torch.no_grad()
def collect_samples(
    model_dir: str | Path | None = None,
    text: str = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    decoder_layers: int = 3,
    skip: tuple[str, ...] = (),
) -> list[LayerSample]:
    """Run the model over ``tokens`` tokens of ``text`` and keep the inputs of the linear layers of
    ``decoder_layers`` evenly spaced decoder layers (first, middle, last by default)."""
    from w4a8_dint.embedded import load_text

    model, tok, extras = load_float_model(model_dir)
    full = load_text(text)
    ids = tok(full[: max(4096, 16 * tokens)], return_tensors="pt").input_ids  # a prefix is enough
    if ids.shape[1] < tokens:
        ids = tok(full, return_tensors="pt").input_ids
    ids = ids[:, :tokens]
    if ids.shape[1] < 8:
        raise OperandError(f"text {text!r} gave only {ids.shape[1]} tokens")
    n_layers = int(getattr(model.config, "num_hidden_layers", 1))
    keep_layers = {str(i) for i in _decoder_layer_indices(n_layers, decoder_layers)}
    linears = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name == s or name.endswith("." + s) for s in skip):
            continue
        parts = name.split(".")
        layer_idx = next((p for p in parts if p.isdigit()), None)
        if layer_idx is None or layer_idx in keep_layers:
            linears[name] = mod
    if not linears:
        raise OperandError("model has no nn.Linear layers to sample")
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).float()))
             for n, m in linears.items()]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    samples = []
    for name, mod in linears.items():
        ex = extras.get(name, {})
        samples.append(LayerSample(
            name, mod.weight.detach().float(), captured[name],
            smooth=None if ex.get("smooth") is None else ex["smooth"].float(),
            input_scale=ex.get("input_scale"),
            codes=dict(ex.get("codes", {})),
        ))
    return samples


def samples_by_kind(samples: list[LayerSample]) -> dict[str, list[LayerSample]]:
    out: dict[str, list[LayerSample]] = {}
    for s in samples:
        out.setdefault(s.kind, []).append(s)
    return out
