"""Weight rounding: the step after a method chose scales and clips, composable with any method.

* ``rtn``  -- every weight to the nearest table value (``formats.quantize_weight``);
* ``gptq`` -- columns rounded one at a time onto the same table with the same group scales, each
  column's rounding error compensated on the not-yet-rounded columns through the inverse Hessian
  of the group's inputs (``calibrate/gptq.py``). Needs the layer inputs, so it turns the
  calibration forward on even for RTN-with-per-token runs. With two-level scales the group scale
  is ``m[n, g] * s[n]``, chosen before the column loop (static groups), so the same loop rounds
  onto the two-level grid and the result keeps its multipliers.

Linears that read one input (q/k/v, gate/up) share the Hessian and are rounded as one stacked
weight (output rows are independent given the Hessian).

Two-level scales (``--scale-scheme two-level``): both roundings choose ``s`` and the multipliers with
``formats.search_two_level_scales``, each column's error weighted by ``diag(H)`` (the energy of its
input channel), so RTN two-level collects the layer inputs too (:meth:`Rounding.for_scale_scheme`).
The method's per-row clip ratios (searched for float group scales) are not applied: the search picks
each group's clip on the integer grid itself. Weighted, the search gave a lower layer output error
than float group scales; unweighted, no lower than the closed form; with the row clips, a little
higher (benchmarks/two_level_search.py, docs/format.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from w4a8_dint.formats import CodeTable, QuantizedWeight

    from ..recipe import CalibrationConfig

GPTQ_FIELDS = ("gptq_hessian_inputs", "gptq_damp", "gptq_block_size", "gptq_act_order")


class Rounding:
    name: str = ""
    summary: str = ""
    needs_hessian: bool = False
    recipe_fields: tuple[str, ...] = ()

    def quantize_group(self, weights: dict[str, "torch.Tensor"], table: "CodeTable", group_size: int,
                       row_clip: dict[str, "torch.Tensor"], hessian: "torch.Tensor | None",
                       cfg: "CalibrationConfig") -> dict[str, "QuantizedWeight"]:
        raise NotImplementedError

    def for_scale_scheme(self, scale_scheme: str) -> "Rounding":
        """The rounding a run with ``scale_scheme`` uses: itself, unless that scheme needs more inputs."""
        return self

    def __repr__(self) -> str:
        return f"<rounding {self.name}>"


class RoundToNearest(Rounding):
    name = "rtn"
    summary = "round every weight to the nearest table value (default)"

    def quantize_group(self, weights, table, group_size, row_clip, hessian, cfg):
        from ..search import quantize_rows

        from w4a8_dint.formats import TWO_LEVEL, quantize_two_level

        if cfg.scale_scheme == TWO_LEVEL:  # the run's scale scheme picks the weight quantizer here and in Gptq
            col_weight = None if hessian is None else _column_importance(hessian)
            return {n: quantize_two_level(w.float(), table, group_size, col_weight=col_weight) for n, w in weights.items()}
        return {n: quantize_rows(w, table, group_size, row_clip.get(n)) for n, w in weights.items()}

    def for_scale_scheme(self, scale_scheme):
        from w4a8_dint.formats import TWO_LEVEL

        return ROUND_TO_NEAREST_TWO_LEVEL if scale_scheme == TWO_LEVEL else self


class RoundToNearestTwoLevel(RoundToNearest):
    """RTN onto two-level scales searched with each column's error weighted by diag(H)."""

    needs_hessian = True


def _column_importance(hessian: "torch.Tensor") -> "torch.Tensor":
    """``diag(H) [K]``: how much a weight error in each input column costs at the output (H ~ X^T X)."""
    import torch

    return torch.diagonal(hessian).float().clamp(min=0)


class Gptq(Rounding):
    name = "gptq"
    summary = "GPTQ: round column by column onto the table, compensating the error with the inputs' inverse Hessian"
    needs_hessian = True
    recipe_fields = GPTQ_FIELDS

    def quantize_group(self, weights, table, group_size, row_clip, hessian, cfg):
        import torch

        from w4a8_dint.formats import TWO_LEVEL, QuantizedWeight, pack_codes, resolve_group_size, search_two_level_scales

        from ..gptq import gptq_codes
        from ..search import row_clip_scales

        if not weights:
            return {}
        names = list(weights)
        rows = [weights[n].shape[0] for n in names]
        w = torch.cat([weights[n].float() for n in names], dim=0)
        clip = None
        if any(n in row_clip for n in names):
            clip = torch.cat([row_clip[n].float().to(w.device) if n in row_clip else torch.ones(r, device=w.device)
                              for n, r in zip(names, rows)])
        g = resolve_group_size(w.shape[1], group_size)
        # static groups: every scale fixed before the column loop
        if cfg.scale_scheme == TWO_LEVEL:  # row clips unused: the search clips each group on the integer grid
            s, mult = search_two_level_scales(w, table, g, col_weight=_column_importance(hessian).to(w.device))
            scales = mult.float() * s  # the group scale m[n, g] * s[n], exactly as formats.quantize_two_level rounds with
        else:
            s, mult = None, None
            scales = row_clip_scales(w, table, g, clip)
        codes = gptq_codes(w, hessian.to(w.device), scales, table, g, block_size=cfg.gptq_block_size,
                           damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
        if mult is None:
            return {n: QuantizedWeight(pack_codes(c.contiguous()), sc.float().contiguous(), table, g)
                    for n, c, sc in zip(names, codes.split(rows), scales.split(rows))}
        return {n: QuantizedWeight(pack_codes(c.contiguous()), sn.contiguous(), table, g, mn.contiguous())
                for n, c, sn, mn in zip(names, codes.split(rows), s.split(rows), mult.split(rows))}


ROUNDING_REGISTRY: dict[str, Rounding] = {r.name: r for r in (RoundToNearest(), Gptq())}
ROUND_TO_NEAREST_TWO_LEVEL = RoundToNearestTwoLevel()  # what "rtn" is in a two-level run (for_scale_scheme)
