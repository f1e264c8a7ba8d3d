"""FPTQ: a per-layer activation policy chosen by the input range, LAE smoothing, group-wise weights.

``max|X| < v0``: per-tensor static INT8; ``v0 <= max|X| < v1``: logarithmic activation
equalization then per-tensor static; otherwise per-token dynamic (paper: v0 = 15, v1 = 150).
"""

from __future__ import annotations

from .base import PER_CHANNEL, GroupChoice, GroupContext, Method

GROUP_CANDIDATES: tuple[int, ...] = (128, 64, 32)  # 128 by default, else the largest that divides every K


def fptq_group_size(in_features: list[int], note: list[str] | None = None) -> int:
    """FPTQ's default group: 128 if it divides every K, else the largest of 64/32 that does."""
    for g in GROUP_CANDIDATES:
        if all(k % g == 0 for k in in_features):
            if g != GROUP_CANDIDATES[0] and note is not None:
                note.append(
                    f"FPTQ group size: 128 does not divide every input dimension ({sorted(set(in_features))}); "
                    f"using {g} (pass --group-size to choose)"
                )
            return g
    if note is not None:
        note.append(f"FPTQ group size: none of {GROUP_CANDIDATES} divides every K; using per channel (-1)")
    return PER_CHANNEL


class Fptq(Method):
    name = "fptq"
    summary = "FPTQ: per-layer policy (static / LAE+static / per-token by max|X|), group 128 by default"
    recipe_fields = ("fptq_bounds",)

    def default_group_size(self, in_features, note):
        return fptq_group_size(in_features, note)

    def checkpoint_act_mode(self, cfg) -> str:
        return "per-token"  # every FPTQ layer is listed with its own mode anyway

    def choose(self, ctx: GroupContext) -> GroupChoice:
        from ..search import lae_scale

        lo, hi = ctx.cfg.fptq_bounds
        v = ctx.max_abs_x
        if v < lo:
            return GroupChoice(None, "per-tensor", {"fptq": "static"})
        if v < hi and ctx.can_smooth:
            return GroupChoice(ctx.constrain(lae_scale(ctx.stats.x_absmax)), "per-tensor", {"fptq": "lae+static"})
        return GroupChoice(None, "per-token", {"fptq": "dynamic"})


METHOD = Fptq()
