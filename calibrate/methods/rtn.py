"""RTN: no smoothing, weights rounded as they are. The floor every other method must beat."""

from __future__ import annotations

from .base import Method


class Rtn(Method):
    name = "rtn"
    summary = "no smoothing; round-to-nearest weights (baseline)"

    def needs_activations(self, cfg) -> bool:
        # Per-token INT8 scales are computed at run time: nothing to calibrate unless the
        # activations are static (per-tensor needs max|X|) or the rounding needs a Hessian.
        return cfg.act_mode == "per-tensor"


METHOD = Rtn()
