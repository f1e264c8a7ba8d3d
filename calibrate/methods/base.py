"""What a calibration method is: an object with the hooks the layer loop calls (not a string).

Per smoothing group (the linears that read one input), the layer loop
(``calibrate/layer.py``) asks the run's method:

* :meth:`Method.needs_activations` -- whether to run the calibration forward at all (RTN with
  per-token activations needs no activation statistics, so that run never touches the data);
* :meth:`Method.choose` -- the group's smoothing scale ``s`` and activation mode, from the
  statistics and, for searching methods, a loss on the search batch;
* :attr:`Method.searches_scales` -- whether a per-row weight clip search follows the choice.

Weight rounding is a separate step (``rounding.py``), so any method composes with any rounding.
Heavy modules (torch, ``search``) are imported inside the hooks: the CLI builds its ``--method``
choices and help from this registry, and ``w4a8 --help`` must stay instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..recipe import CalibrationConfig
    from ..search import ScaleStats

PER_CHANNEL = -1  # formats.PER_CHANNEL (not imported: formats imports torch)
SEARCH_FIELDS = ("alpha_grid", "alpha_search", "scale_families", "clip_grid")  # recipe fields of searching methods


@dataclass
class GroupContext:
    """What a method sees of one smoothing group when it picks the group's scale and activation mode."""

    cfg: "CalibrationConfig"
    stats: "ScaleStats | None"  # None when the run collects no activations
    max_abs_x: float  # max |X| over the group's input (nan without activations)
    can_smooth: bool  # False when a linear of the group is kept in float
    constrain: Callable[["torch.Tensor"], "torch.Tensor"]  # tie channels that must share a scale (GQA, ...)
    # loss(act_mode, quantize_act)(s) -> output error of the group with weights (and inputs) quantized
    loss: Callable[[str, bool], Callable[["torch.Tensor"], float]]


@dataclass
class GroupChoice:
    scale: "torch.Tensor | None"  # None: no smoothing
    act_mode: str
    record: dict[str, Any] = field(default_factory=dict)  # JSON-safe, kept in quantization_config


class Method:
    """Base: no smoothing, the recipe's activation mode, per-channel weights by default."""

    name: str = ""
    summary: str = ""  # one line: the CLI's --method help and the docs' method table
    searches_scales: bool = False  # alpha grid + per-row clip search (AWQ, AQAS)
    loss_quantizes_activations: bool = False  # the search loss sees INT8 inputs (AQAS's point)
    scale_families: tuple[str, ...] = ()  # families searched by default
    recipe_fields: tuple[str, ...] = ()  # CalibrationConfig fields only this method uses (kept in the record)

    def needs_activations(self, cfg: "CalibrationConfig") -> bool:
        return True

    def default_group_size(self, in_features: list[int], note: list[str] | None) -> int:
        return PER_CHANNEL

    def checkpoint_act_mode(self, cfg: "CalibrationConfig") -> str:
        """The config-wide act_mode written to the checkpoint (layers may override it)."""
        return cfg.act_mode

    def choose(self, ctx: GroupContext) -> GroupChoice:
        return GroupChoice(None, ctx.cfg.act_mode)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class SearchedScales(Method):
    """AWQ and AQAS: search ``s`` over the families' alpha grids (and ``s = 1``), then per-row clips."""

    searches_scales = True
    recipe_fields = SEARCH_FIELDS

    def choose(self, ctx: GroupContext) -> GroupChoice:
        from ..search import search_scale

        cfg = ctx.cfg
        loss = ctx.loss(cfg.act_mode, self.loss_quantizes_activations)
        families = cfg.families if ctx.can_smooth else ()
        choice = search_scale(families, cfg.alpha_grid, ctx.stats, loss, ctx.constrain, full_grid=cfg.alpha_search == "full")
        return GroupChoice(
            None if choice.family == "none" else choice.scale, cfg.act_mode,
            {"family": choice.family, "alpha": choice.alpha,
             "loss_vs_unsmoothed": float(f"{choice.loss / max(choice.identity_loss, 1e-30):.4g}")})
