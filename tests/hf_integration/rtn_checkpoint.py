"""Test helper: a w4a8-dint checkpoint of the embedded SmolLM2 by plain RTN (not a calibrator).

Covers every checkpoint feature the loaders must handle:
* every q/k/v/o/gate/up/down linear quantized (``formats.quantize_weight``, absmax scales),
  lm_head (tied to the embeddings) kept float via ``modules_to_not_convert``;
* one **per-tensor static** layer with an ``input_scale`` measured on real C4 text;
* one **smoothed** input site, ``gate_proj`` + ``up_proj`` of one layer (SmoothQuant alpha=0.5 from the same
  activations, one vector for both because they read the same input and vLLM fuses them): each weight is
  multiplied by ``s`` column-wise and stores ``smooth_scale = s``; the layer divides its input by ``s``.

Usage outside pytest: ``python tests/hf_integration/rtn_checkpoint.py OUT [--group-size 64] [--format dint4-a]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from w4a8_dint import formats as F
from w4a8_dint.checkpoint import write_checkpoint
from w4a8_dint.config import LayerPolicy, W4A8Config, quantized_weight_tensors
from w4a8_dint.embedded import c4_text, embedded_model_dir

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STATIC_LAYER = "model.layers.3.self_attn.o_proj"
SMOOTH_SITE = ("model.layers.4.mlp.gate_proj", "model.layers.4.mlp.up_proj")
CALIB_TOKENS = 256


def input_absmax(model_dir: Path, layers: list[str], tokens: int = CALIB_TOKENS) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named linear's input over ``tokens`` tokens of C4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(c4_text()[:20000], return_tensors="pt").input_ids[:, :tokens]
    stats: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, inp, out, name=name: stats.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(0))
        )
        for name in layers
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


def build_rtn_checkpoint(
    out_dir: str | Path, group_size: int = F.PER_CHANNEL, fmt: str = "dint4-a", model_dir: Path | None = None,
    static_layer: str | None = STATIC_LAYER, smooth_site: tuple[str, ...] = SMOOTH_SITE, overwrite: bool = False,
    scale_scheme: str = F.FLOAT_SCALES,
) -> Path:
    model_dir = Path(model_dir or embedded_model_dir())
    hf_config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    table = F.get_format(fmt)
    special = [n for n in (static_layer, *smooth_site[:1]) if n]
    absmax = input_absmax(model_dir, special) if special else {}
    smooth = None
    if smooth_site:
        act = absmax[smooth_site[0]].clamp(min=1e-5)
        w_max = torch.stack([state[f"{p}.weight"].float().abs().amax(0) for p in smooth_site]).amax(0)
        smooth = (act.sqrt() / w_max.clamp(min=1e-5).sqrt()).clamp(min=1e-2).float()

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerPolicy] = {}
    for name, t in state.items():
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix.endswith(LINEAR_SUFFIXES)):
            tensors[name] = t
            continue
        w = t.float()
        if prefix in smooth_site:
            w = w * smooth  # y = (x / s) @ (W * s)^T
            tensors[f"{prefix}.smooth_scale"] = smooth.clone()
            layers[prefix] = LayerPolicy(act_mode="per-token", smooth=True)
        if prefix == static_layer:
            tensors[f"{prefix}.input_scale"] = (absmax[prefix].max() / 127).reshape(1).float()
            layers[prefix] = LayerPolicy(act_mode="per-tensor")
        if scale_scheme == F.TWO_LEVEL:
            qw = F.quantize_two_level(w, table, group_size)
        else:
            qw = F.quantize_weight(w, table, group_size)
        tensors.update(quantized_weight_tensors(prefix, qw))
    qcfg = W4A8Config(
        format=fmt, group_size=group_size, scale_scheme=scale_scheme, layers=layers, method="rtn",
        calibration={"dataset": "c4", "num_tokens": CALIB_TOKENS, "note": "test helper: RTN absmax weights"},
    )
    return write_checkpoint(out_dir, tensors, hf_config, qcfg, source_dir=model_dir, overwrite=overwrite)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--group-size", type=int, default=F.PER_CHANNEL)
    p.add_argument("--format", default="dint4-a", choices=sorted(F.FORMATS))
    p.add_argument("--plain", action="store_true", help="no static or smoothed layer")
    a = p.parse_args()
    kw = {"static_layer": None, "smooth_site": ()} if a.plain else {}
    print(build_rtn_checkpoint(a.out, a.group_size, a.format, overwrite=True, **kw))


if __name__ == "__main__":
    main()
