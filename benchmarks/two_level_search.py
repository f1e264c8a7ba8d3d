"""Two-level group scales: the searched choice of (s, m) vs the bracketing closed form vs float g64.

On real SmolLM2-135M decoder layers (inputs from the float layers before them, C4 calibration
text, held-out PTB for the error), for each method (rtn, aqas: its real plan, i.e. smoothing,
activation modes and per-row clips, shared by every variant) and rounding (rtn, gptq), every
linear is quantized at g64 with

* ``float``       -- float group scales (absmax x the method's row clip), what ``--scale-scheme float`` runs;
* ``closed``      -- two-level ``formats.two_level_scales`` (6 ratios, m bracketing each group's absmax);
* ``search``      -- two-level ``formats.search_two_level_scales`` (s and every m searched jointly);
* ``search_h``    -- the same, error weighted by diag(H) of the layer's calibration inputs: what
  ``calibrate`` runs (``calibrate/methods/rounding.py``);
* ``*_clip``      -- the search with the method's per-row clip ratios bounding the group scales;

and the linear output error ``||y_q - y||^2 / ||y||^2`` is measured with ``reference.w4a8_linear_reference``
(the integer kernel math) on held-out text, averaged over the layer's 7 linears.

    python benchmarks/two_level_search.py [--layers 2,12,24] [--formats dint4-a,int4] [--threads 1]

Writes benchmarks/results/two_level_search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from w4a8_dint.calibrate.arch import FOLD_EXPLICIT, fold_into_source, infer_structure, scale_linear_inputs
from w4a8_dint.calibrate.data import calibration_data
from w4a8_dint.calibrate.gptq import gptq_codes
from w4a8_dint.calibrate.layer import LayerCalibrator
from w4a8_dint.calibrate.recipe import CalibrationConfig
from w4a8_dint.calibrate.search import row_clip_scales, static_input_scale
from w4a8_dint.calibrate.stream import LayerStream, build_skeleton
from w4a8_dint.embedded import embedded_model_dir, ptb_text
from w4a8_dint.formats import (
    QuantizedWeight, get_format, pack_codes, quantize_to_codes, search_two_level_scales, two_level_scales,
)
from w4a8_dint.reference import w4a8_linear_reference

OUT = Path(__file__).resolve().parent / "results" / "two_level_search.json"
CAL = (32, 256)  # C4 calibration windows: 8192 tokens in batches of 2 (the first is the search batch)
HELD = (4, 256)  # held-out PTB test tokens
SEARCH = dict(alpha_grid=(0.0, 0.25, 0.5, 0.75, 1.0), clip_grid=(1.0, 0.9, 0.8), search_tokens=512)
GROUP = 64
VARIANTS = ("float", "closed", "search", "search_h", "search_clip", "search_h_clip")


def group_scales(variant: str, w: torch.Tensor, table, clip: torch.Tensor | None, hess: torch.Tensor):
    """``(scales [N, K/G] the codes are rounded with, s [N, 1] or None, m or None)``."""
    if variant == "float":
        return row_clip_scales(w, table, GROUP, clip), None, None
    if variant == "closed":
        s, m = two_level_scales(w, table, GROUP, clip)
    else:
        s, m = search_two_level_scales(w, table, GROUP, clip if variant.endswith("_clip") else None,
                                       col_weight=torch.diagonal(hess) if "_h" in variant else None)
    return m.float() * s, s, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,12,24")
    ap.add_argument("--formats", default="dint4-a,int4")
    ap.add_argument("--methods", default="rtn,aqas")
    ap.add_argument("--variants", default="float,closed,search_h")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    variants = tuple(args.variants.split(","))
    torch.set_num_threads(args.threads)
    layers = sorted(int(v) for v in args.layers.split(","))
    from transformers import AutoTokenizer

    src = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    cal_ids = calibration_data(tok, "c4", CAL[0], CAL[1], seed=0).input_ids
    held_ids = torch.tensor(tok(ptb_text("test")[:80000])["input_ids"][:HELD[0] * HELD[1]]).reshape(*HELD)
    skeleton = build_skeleton(src)
    stream = LayerStream(skeleton, src, torch.device("cpu"))
    stream.load_outer_modules()
    runs = [stream.record_calls(ids) for ids in (*cal_ids.split(2), held_ids, cal_ids[:1, :64])]
    hidden = [h for h, _ in runs]
    rows, search_cpu_s, start = [], {"closed": 0.0, "search": 0.0, "search_h": 0.0}, time.perf_counter()
    with torch.no_grad():
        for i in range(max(layers) + 1):
            layer = stream.materialize(i)
            if i in layers:
                name = skeleton.layer_prefix(i)
                calls = [c[i] for _, c in runs]
                structure = infer_structure(layer, lambda: calls[-1](layer, hidden[-1]), hidden[-1], name)
                for fmt in args.formats.split(","):
                    table = get_format(fmt)
                    for method in args.methods.split(","):
                        rows.append(measure(layer, name, structure, hidden, calls, table, method, variants, search_cpu_s))
                        print(json.dumps(rows[-1]), flush=True)
            hidden = [c[i](layer, h) for h, (_, c) in zip(hidden, runs)]
            stream.release(i)
    keys = [f"{v}_{r}" for r in ("rtn", "gptq") for v in variants]
    summary = {
        "what": "mean over a decoder layer's 7 linears of ||y_q - y||^2 / ||y||^2 on held-out PTB (integer reference "
                f"kernel), g{GROUP}, two-level scale choices vs float group scales; same method plan for every variant",
        "calibration_tokens": CAL[0] * CAL[1], "held_out_tokens": HELD[0] * HELD[1],
        "search": {k: list(v) if isinstance(v, tuple) else v for k, v in SEARCH.items()},
        "mean_ratio_to_float_same_rounding": {
            k: round(sum(r[k] / r[f"float_{k.rsplit('_', 1)[1]}"] for r in rows) / len(rows), 4) for k in keys},
        "search_h_not_worse_than_closed": {
            r: sum(row[f"search_h_{r}"] <= row[f"closed_{r}"] for row in rows) for r in ("rtn", "gptq")
            if {"search_h", "closed"} <= set(variants)},
        "cells": len(rows),
        "scale_choice_cpu_s": {k: round(v, 1) for k, v in search_cpu_s.items()},
        "wall_s": round(time.perf_counter() - start, 1), "loadavg": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))


def measure(layer0, name, structure, hidden, calls, table, method, variants, cpu_s) -> dict:
    import copy

    cfg = CalibrationConfig(method=method, format=table.name, group_size=GROUP, progress=False,
                            **(SEARCH if method == "aqas" else {}))
    layer = copy.deepcopy(layer0)
    calib = LayerCalibrator(cfg, table, GROUP, skip=lambda n: False)
    cal_h, cal_c = hidden[:-2], calls[:-2]
    caps, _, _ = calib.capture(layer, name, structure, cal_h, cal_c, False)
    plans = {g.name: calib.plan(layer, g, caps[g.name]) for g in structure.groups}
    for g in structure.groups:
        if plans[g.name].scale is not None:
            fold_into_source(layer, g, plans[g.name].scale)
            scale_linear_inputs(layer, g, plans[g.name].scale)
    hess = calib.hessians(layer, structure, plans, caps, cal_h, cal_c)
    held: dict[str, torch.Tensor] = {}
    hooks = [layer.get_submodule(g.linears[0]).register_forward_pre_hook(
        lambda m, a, name=g.name: held.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).float())) for g in structure.groups]
    calls[-2](layer, hidden[-2])
    for h in hooks:
        h.remove()
    errs: dict[str, list[float]] = {}
    for g in structure.groups:
        p = plans[g.name]
        smooth = p.scale if p.scale is not None and g.fold == FOLD_EXPLICIT else None
        input_scale = static_input_scale(caps[g.name].absmax, p.scale) if p.act_mode == "per-tensor" else None
        x = held[g.name]
        xs = x if smooth is None else x / smooth
        for n in g.linears:
            w = layer.get_submodule(n).weight.detach().float()
            y = xs @ w.t()
            for v in variants:
                t0 = time.process_time()
                scales, s, m = group_scales(v, w, table, p.row_clip.get(n), hess[g.name])
                if v in cpu_s:
                    cpu_s[v] += time.process_time() - t0
                for rounding in ("rtn", "gptq"):
                    codes = (quantize_to_codes(w, scales, table, GROUP) if rounding == "rtn" else
                             gptq_codes(w, hess[g.name], scales, table, GROUP, damp=cfg.gptq_damp))
                    qw = QuantizedWeight(pack_codes(codes), scales if s is None else s, table, GROUP, m)
                    yq = w4a8_linear_reference(x, qw, p.act_mode, input_scale, smooth)
                    errs.setdefault(f"{v}_{rounding}", []).append(float((yq - y).pow(2).sum() / y.pow(2).sum()))
    row = {"layer": int(name.rsplit(".", 1)[1]), "format": table.name, "method": method}
    row.update({k: round(sum(e) / len(e), 6) for k, e in errs.items()})
    return row


if __name__ == "__main__":
    main()
