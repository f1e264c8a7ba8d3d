"""AWQ: search ``a`` for ``s = mean|X|^a / mean|W_hat|^(1-a)`` with a weight-only quantized loss."""

from __future__ import annotations

from .base import SearchedScales


class Awq(SearchedScales):
    name = "awq"
    summary = "AWQ: mean-based scales searched with a weight-only quantized loss, per-row clip search (baseline)"
    scale_families = ("mean",)
    loss_quantizes_activations = False


METHOD = Awq()
