"""Test helper: tiny random Llama / GPT-NeoX / BERT models built locally (no download) and RTN checkpoints of them.

``tiny_model_dir(arch, root)`` saves a random float model with ``save_pretrained`` (so tensor names are
what transformers writes, e.g. GPT-NeoX's ``embed_out.weight``); ``rtn_checkpoint(model_dir, out)``
quantizes every linear inside the decoder layers (``formats.quantize_weight``), keeps the rest float
with the derived ``modules_to_not_convert``, and for Llama gives one layer a static ``input_scale``
and one gate/up pair a shared ``smooth_scale``. ``edited_copy`` makes a bad checkpoint from a good one
without any validation on the way (that is the point). Other test packages load this file by path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from w4a8_dint import formats as F
from w4a8_dint.checkpoint import write_checkpoint
from w4a8_dint.config import LayerPolicy, W4A8Config
from w4a8_dint.contract import read_hf_config, read_tensors, structure_from_config

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                  tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=128, max_position_embeddings=128),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=128, max_position_embeddings=128, is_decoder=True),
}
STATIC_LAYER = "model.layers.0.self_attn.o_proj"
SMOOTH_SITE = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
GROUP = 32


def tiny_model_dir(arch: str, root: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = Path(root) / f"tiny-{arch}"
    if (out / "config.json").is_file():
        return out
    spec = dict(ARCH_CONFIGS[arch])
    config = CONFIG_MAPPING[spec.pop("model_type")](**spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return out


def rtn_checkpoint(model_dir: Path, out: Path, group_size: int = GROUP, special_layers: bool = True,
                   modules_to_not_convert: list[str] | None = None) -> Path:
    """Every decoder-layer linear RTN-quantized; everything else copied float. Validated on write."""
    hf_config = read_hf_config(model_dir)
    structure = structure_from_config(hf_config)
    source = read_tensors(model_dir)
    table = F.get_format("dint4-a")
    layers: dict[str, LayerPolicy] = {}
    quantize = [n for n in structure.linears if n not in structure.float_modules]
    tensors = {k: v for k, v in source.items() if k.removesuffix(".weight") not in quantize}
    smooth = torch.linspace(0.5, 2.0, structure.linears[SMOOTH_SITE[0]][1]) if special_layers and \
        SMOOTH_SITE[0] in structure.linears else None
    for prefix in quantize:
        w = source[f"{prefix}.weight"].float()
        if smooth is not None and prefix in SMOOTH_SITE:
            w = w * smooth
            tensors[f"{prefix}.smooth_scale"] = smooth.clone()
            layers[prefix] = LayerPolicy("per-token", smooth=True)
        qw = F.quantize_weight(w, table, group_size)
        tensors[f"{prefix}.qweight"], tensors[f"{prefix}.weight_scale"] = qw.packed, qw.scales
        if special_layers and prefix == STATIC_LAYER:
            tensors[f"{prefix}.input_scale"] = torch.tensor([0.02])
            layers[prefix] = LayerPolicy("per-tensor")
    not_convert = modules_to_not_convert if modules_to_not_convert is not None else sorted(structure.float_modules)
    qcfg = W4A8Config(group_size=group_size, layers=layers, modules_to_not_convert=not_convert)
    return write_checkpoint(out, tensors, hf_config, qcfg, source_dir=model_dir)


def edited_copy(src: Path, dst: Path, edit_tensors: Callable[[dict], None] | None = None,
                edit_config: Callable[[dict], None] | None = None) -> Path:
    """Copy a checkpoint as one safetensors file + config.json, applying the edits; no validation."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tensors = read_tensors(src)
    cfg = json.loads((Path(src) / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
