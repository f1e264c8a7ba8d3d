"""Read a written checkpoint back and measure it against the float model (tests, benchmark, study).

* :func:`quantized_layer` rebuilds decoder layer ``i`` **from the checkpoint's tensors alone**:
  norms and biases as written (with folded smoothing), every quantized linear replaced by a
  module running ``reference.w4a8_linear_reference`` (exact INT8 x 4-bit integer math) or, for
  speed, its float fake-quant equivalent.
* :func:`layer_errors` runs float and quantized layers on the same float inputs (real text) and
  returns the relative error of each layer's update.
* :func:`fake_quant_model` is an in-memory float model with every quantized linear simulated,
  for perplexity in the benchmark. It is a measuring device, not the loader
  (``hf_integration`` owns ``from_pretrained`` of a checkpoint).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn

from w4a8_dint.checkpoint import load_tensors, quantized_prefixes, read_qconfig, shard_files
from w4a8_dint.config import BIAS, INPUT_SCALE, SMOOTH_SCALE, W4A8Config, read_quantized_weight
from w4a8_dint.reference import fake_quantize_activation, w4a8_linear_reference

from .stream import LayerStream, _set_param, build_skeleton


class ReferenceW4A8Linear(nn.Module):
    """One quantized linear from checkpoint tensors; ``exact=True`` runs the integer reference."""

    def __init__(self, tensors: dict[str, torch.Tensor], qcfg: W4A8Config, prefix: str, exact: bool = True):
        super().__init__()
        self.weight_q = read_quantized_weight(prefix, tensors, qcfg)  # float or two-level scales
        pol = qcfg.policy(prefix)
        self.act_mode = pol.act_mode
        self.input_scale = tensors.get(f"{prefix}.{INPUT_SCALE}")
        self.smooth_scale = tensors.get(f"{prefix}.{SMOOTH_SCALE}")
        self.bias_ = tensors.get(f"{prefix}.{BIAS}")
        self.exact = exact
        self.dequantized = None if exact else self.weight_q.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return w4a8_linear_reference(x, self.weight_q, self.act_mode, self.input_scale, self.smooth_scale,
                                         None if self.bias_ is None else self.bias_.float())
        xf = x.float()
        if self.smooth_scale is not None:
            xf = xf / self.smooth_scale.float()
        xf = fake_quantize_activation(xf, self.act_mode, self.input_scale)
        bias = None if self.bias_ is None else self.bias_.float()
        return torch.nn.functional.linear(xf, self.dequantized, bias).to(x.dtype)


def _install(layer: nn.Module, layer_name: str, tensors: dict[str, torch.Tensor], qcfg: W4A8Config, exact: bool) -> nn.Module:
    """Overwrite a float layer's parameters with the checkpoint's and swap in quantized linears."""
    prefixes = [p for p in quantized_prefixes(tensors) if p.startswith(layer_name + ".")]
    for p in prefixes:
        parent, _, child = p[len(layer_name) + 1:].rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, ReferenceW4A8Linear(tensors, qcfg, p, exact))
    for n, _ in list(layer.named_parameters()):
        full = f"{layer_name}.{n}"
        if full not in tensors:
            raise KeyError(f"checkpoint lacks {full}")
        _set_param(layer, n, tensors[full].float())
    return layer


def quantized_layer(ckpt_dir: str | Path, layer_name: str, template: nn.Module, exact: bool = True) -> nn.Module:
    """Decoder layer ``layer_name`` rebuilt from the checkpoint (``template`` only gives the module structure)."""
    qcfg = read_qconfig(ckpt_dir)
    names = [n for n in shard_files(ckpt_dir) if n.startswith(layer_name + ".")]
    tensors = load_tensors(ckpt_dir, names)
    return _install(copy.deepcopy(template), layer_name, tensors, qcfg, exact)


@torch.no_grad()
def layer_errors(source_dir: str | Path, ckpt_dir: str | Path, input_ids: torch.Tensor, num_layers: int,
                 exact: bool = True) -> list[float]:
    """``||y_q - y||^2 / ||y - x||^2`` per decoder layer on float inputs ``x`` (relative error of the update)."""
    skeleton = build_skeleton(source_dir)
    stream = LayerStream(skeleton, Path(source_dir), torch.device("cpu"))
    stream.load_outer_modules()
    hidden, calls = stream.record_calls(input_ids)
    errors = []
    for i in range(num_layers):
        name = skeleton.layer_prefix(i)
        layer = stream.materialize(i)
        y = calls[i](layer, hidden)
        q = quantized_layer(ckpt_dir, name, layer, exact)
        yq = calls[i](q, hidden)
        errors.append(float((yq - y).pow(2).sum() / (y - hidden).pow(2).sum()))
        hidden = y
        stream.release(i)
    return errors


@torch.no_grad()
def fake_quant_model(ckpt_dir: str | Path, source_dir: str | Path) -> nn.Module:
    """A float causal LM from ``source_dir`` with every quantized layer of ``ckpt_dir`` simulated."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    qcfg = read_qconfig(ckpt_dir)
    tensors = load_tensors(ckpt_dir)
    skeleton = build_skeleton(source_dir)
    layers = model.get_submodule(skeleton.layers_name)
    for i, layer in enumerate(layers):
        name = f"{skeleton.layers_name}.{i}"
        if any(p.startswith(name + ".") for p in quantized_prefixes(tensors)):
            _install(layer, name, tensors, qcfg, exact=False)
    return model


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512, max_tokens: int = 8192) -> float:
    """Non-overlapping windows of ``seq_len`` over the first ``max_tokens`` tokens (no BOS)."""
    ids = token_ids[: (min(max_tokens, token_ids.numel()) // seq_len) * seq_len].reshape(-1, seq_len)
    nll, count = 0.0, 0
    for row in ids:
        logits = model(input_ids=row[None]).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum"))
        count += seq_len - 1
    return math.exp(nll / count)
