"""SmoothQuant: ``s = max|X_j|^a / max|W_j|^(1-a)`` with a fixed migration strength ``a``."""

from __future__ import annotations

from .base import GroupChoice, GroupContext, Method


class SmoothQuant(Method):
    name = "smoothquant"
    summary = "SmoothQuant scales max|X|^a / max|W|^(1-a), fixed a (--alpha, default 0.5) (baseline)"
    recipe_fields = ("smoothquant_alpha",)

    def choose(self, ctx: GroupContext) -> GroupChoice:
        from ..search import normalize, smoothquant_scale

        if not ctx.can_smooth:
            return GroupChoice(None, ctx.cfg.act_mode)
        s = smoothquant_scale(ctx.stats.x_absmax, ctx.stats.w_absmax, ctx.cfg.smoothquant_alpha)
        return GroupChoice(normalize(ctx.constrain(s)), ctx.cfg.act_mode)


METHOD = SmoothQuant()
