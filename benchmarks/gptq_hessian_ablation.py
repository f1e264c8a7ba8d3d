"""Ablation: GPTQ's Hessian from INT8-quantized or float layer inputs, on real SmolLM2 layers.

For each chosen decoder layer, each method (rtn, aqas) and granularity (per channel, g64), the layer is
calibrated with ``--rounding gptq`` twice (``gptq_hessian_inputs`` = quantized / float; everything
else identical) and with ``--rounding rtn``; the W4A8 layer output error is measured the way the kernel
computes it (every linear run by ``reference.w4a8_linear_reference``) on held-out PTB text, as
``||y_q - y||^2 / ||y - x||^2``. Inputs of layer L come from the float layers before it.

    python benchmarks/gptq_hessian_ablation.py [--layers 2,12,24] [--format dint4-a] [--threads 1]

Writes benchmarks/results/gptq_hessian_ablation.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from w4a8_dint.calibrate.arch import infer_structure
from w4a8_dint.calibrate.data import calibration_data
from w4a8_dint.calibrate.layer import LayerCalibrator
from w4a8_dint.calibrate.recipe import CalibrationConfig
from w4a8_dint.calibrate.stream import LayerStream, build_skeleton
from w4a8_dint.calibrate.verify import _install
from w4a8_dint.config import W4A8Config
from w4a8_dint.embedded import embedded_model_dir, ptb_text
from w4a8_dint.formats import get_format

OUT = Path(__file__).resolve().parent / "results" / "gptq_hessian_ablation.json"
CAL = (32, 256)  # calibration windows (C4): 8192 tokens, batches of 2 windows (the first is the search batch)
HELD = (4, 256)  # held-out PTB test tokens
SEARCH = dict(alpha_grid=(0.0, 0.25, 0.5, 0.75, 1.0), clip_grid=(1.0, 0.9, 0.8), search_tokens=512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,12,24")
    ap.add_argument("--format", default="dint4-a")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = sorted(int(v) for v in args.layers.split(","))
    from transformers import AutoTokenizer

    src = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    cal_ids = calibration_data(tok, "c4", CAL[0], CAL[1], seed=0).input_ids
    n = HELD[0] * HELD[1]
    held_ids = torch.tensor(tok(ptb_text("test")[:80000])["input_ids"][:n]).reshape(*HELD)
    skeleton = build_skeleton(src)
    stream = LayerStream(skeleton, src, torch.device("cpu"))
    stream.load_outer_modules()
    runs = [stream.record_calls(ids) for ids in (*cal_ids.split(2), held_ids, cal_ids[:1, :64])]
    hidden = [h for h, _ in runs]
    table = get_format(args.format)
    rows = []
    with torch.no_grad():
        for i in range(max(layers) + 1):
            layer = stream.materialize(i)
            if i in layers:
                name = skeleton.layer_prefix(i)
                calls = [c[i] for _, c in runs]
                structure = infer_structure(layer, lambda: calls[-1](layer, hidden[-1]), hidden[-1], name)
                x_held, call_held = hidden[-2], calls[-2]
                y = call_held(layer, x_held)
                for method in ("rtn", "aqas"):
                    for group in (-1, 64):
                        row = {"layer": i, "method": method, "group_size": group, "format": table.name}
                        for rounding, hess in (("rtn", None), ("gptq", "quantized"), ("gptq", "float")):
                            cfg = CalibrationConfig(method=method, rounding=rounding, format=table.name, group_size=group,
                                                    gptq_hessian_inputs=hess or "quantized", progress=False,
                                                    **(SEARCH if method == "aqas" else {}))
                            start = time.perf_counter()
                            res = LayerCalibrator(cfg, table, group, skip=lambda n: False).calibrate(
                                copy.deepcopy(layer), name, structure, hidden[:-2], calls[:-2], hidden[-1], calls[-1])
                            q = _install(copy.deepcopy(layer), name, res.tensors,
                                         W4A8Config(format=table.name, group_size=group, layers=res.policies), exact=True)
                            err = float((call_held(q, x_held) - y).pow(2).sum() / (y - x_held).pow(2).sum())
                            key = rounding if hess is None else f"gptq_{hess}"
                            row[key] = round(err, 6)
                            row[f"{key}_s"] = round(time.perf_counter() - start, 1)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
            hidden = [c[i](layer, h) for h, (_, c) in zip(hidden, runs)]
            stream.release(i)
    wins = sum(r["gptq_quantized"] < r["gptq_float"] for r in rows)
    summary = {
        "what": "W4A8 layer output error ||y_q - y||^2 / ||y - x||^2 on held-out PTB (integer reference kernel), "
                "GPTQ Hessian from INT8-quantized vs float inputs",
        "calibration_tokens": CAL[0] * CAL[1], "held_out_tokens": n, "search": {k: list(v) if isinstance(v, tuple) else v for k, v in SEARCH.items()},
        "quantized_wins": f"{wins}/{len(rows)}",
        "mean_ratio_quantized_over_float": round(sum(r["gptq_quantized"] / r["gptq_float"] for r in rows) / len(rows), 4),
        "mean_ratio_gptq_quantized_over_rtn": round(sum(r["gptq_quantized"] / r["rtn"] for r in rows) / len(rows), 4),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
