"""Weight rounding: the step after a method chose scales and clips, composable with any method.

* ``rtn``  -- every weight to the nearest table value (``formats.quantize_weight``);
* ``gptq`` -- columns rounded one at a time onto the same table with the same group scales, each
  column's rounding error compensated on the not-yet-rounded columns through the inverse Hessian
  of the group's inputs (``calibrate/gptq.py``). Needs the layer inputs, so it turns the
  calibration forward on even for RTN-with-per-token runs.

Linears that read one input (q/k/v, gate/up) share the Hessian and are rounded as one stacked
weight (output rows are independent given the Hessian).
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

    def __repr__(self) -> str:
        return f"<rounding {self.name}>"


class RoundToNearest(Rounding):
    name = "rtn"
    summary = "round every weight to the nearest table value (default)"

    def quantize_group(self, weights, table, group_size, row_clip, hessian, cfg):
        from ..search import quantize_rows

        from w4a8_dint.formats import TWO_LEVEL, quantize_two_level

        if cfg.scale_scheme == TWO_LEVEL:  # the one place the run's scale scheme picks the weight quantizer
            return {n: quantize_two_level(w.float(), table, group_size, row_clip.get(n)) for n, w in weights.items()}
        return {n: quantize_rows(w, table, group_size, row_clip.get(n)) for n, w in weights.items()}


class Gptq(Rounding):
    name = "gptq"
    summary = "GPTQ: round column by column onto the table, compensating the error with the inputs' inverse Hessian"
    needs_hessian = True
    recipe_fields = GPTQ_FIELDS

    def quantize_group(self, weights, table, group_size, row_clip, hessian, cfg):
        import torch

        from w4a8_dint.formats import QuantizedWeight, pack_codes, resolve_group_size

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
        scales = row_clip_scales(w, table, g, clip)  # static groups: every scale fixed before the column loop
        codes = gptq_codes(w, hessian.to(w.device), scales, table, g, block_size=cfg.gptq_block_size,
                           damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
        out = {}
        for n, c, s in zip(names, codes.split(rows), scales.split(rows)):
            out[n] = QuantizedWeight(pack_codes(c.contiguous()), s.float().contiguous(), table, g)
        return out


ROUNDING_REGISTRY: dict[str, Rounding] = {r.name: r for r in (RoundToNearest(), Gptq())}
