"""Shared fixture: a small but real w4a8-dint checkpoint (the embedded model's first two layers)."""

import json

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.checkpoint import write_checkpoint
from w4a8_dint.config import LayerPolicy, W4A8Config
from w4a8_dint.embedded import embedded_model_dir

CHECKPOINT_LAYERS = 2


def write_small_checkpoint(out_dir, fmt: str = "dint4-a", layers: int = CHECKPOINT_LAYERS):
    """RTN checkpoint of the embedded SmolLM2 cut to ``layers`` decoder layers (a valid, smaller Llama).

    Layer 0 q/k/v carry one smoothing vector, layer 0 down_proj is per-tensor static, so both
    activation paths of the hardware model's operand extraction are exercised.
    """
    from safetensors.torch import load_file

    src = embedded_model_dir()
    state = load_file(str(src / "model.safetensors"))
    keep = {f"model.layers.{i}." for i in range(layers)}
    table = F.get_format(fmt)
    tensors, policies = {}, {}
    g = torch.Generator().manual_seed(0)
    # q/k/v share one input (vLLM fuses them): the contract requires one smoothing vector for all three.
    attn_smooth = torch.rand(state["model.layers.0.self_attn.q_proj.weight"].shape[1], generator=g) + 0.5
    for name, t in state.items():
        if name.startswith("model.layers.") and not any(name.startswith(k) for k in keep):
            continue
        if not name.endswith("_proj.weight"):
            tensors[name] = t
            continue
        prefix = name[: -len(".weight")]
        w = t.float()
        if prefix.startswith("model.layers.0.self_attn.") and prefix.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
            smooth = attn_smooth
            tensors[f"{prefix}.smooth_scale"] = smooth.clone()  # safetensors refuses shared storage
            w = w * smooth  # (x / s) @ (W * s)^T == x @ W^T
            policies[prefix] = LayerPolicy(smooth=True)
        if prefix == "model.layers.0.mlp.down_proj":
            tensors[f"{prefix}.input_scale"] = torch.tensor([0.05])
            policies[prefix] = LayerPolicy(act_mode="per-tensor")
        q = F.quantize_weight(w, table)
        tensors[f"{prefix}.qweight"] = q.packed
        tensors[f"{prefix}.weight_scale"] = q.scales
    hf_config = json.loads((src / "config.json").read_text())
    hf_config["num_hidden_layers"] = layers
    return write_checkpoint(out_dir, tensors, hf_config, W4A8Config(format=fmt, layers=policies), source_dir=src)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    return write_small_checkpoint(tmp_path_factory.mktemp("hw") / "ckpt")
