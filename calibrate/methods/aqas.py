"""AQAS: activation-quantization-aware scaling.

Searches both scale families (mean- and max-based) and ``s = 1`` with a loss in which the weights
are quantized to the 4-bit format *and* the input to INT8 in the deployed mode; then per-row clips
under the same loss.
"""

from __future__ import annotations

from .base import SearchedScales


class Aqas(SearchedScales):
    name = "aqas"
    summary = "activation-quantization-aware scaling: scales and clips searched with W4 and INT8 inputs in the loss (default)"
    scale_families = ("mean", "max")
    loss_quantizes_activations = True


METHOD = Aqas()
