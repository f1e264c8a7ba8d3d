"""``w4a8 calibrate [MODEL] --out DIR``: quantize a model to a w4a8-dint checkpoint.

Imports nothing heavy at module level (``w4a8 --help`` stays instant).
"""

from __future__ import annotations

import argparse
import json
import sys


def _choices_help(registry: dict, default: str) -> str:
    return "; ".join(f"{name}: {impl.summary}" for name, impl in registry.items()) + f" (default {default})"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output checkpoint directory (written atomically)")
    from .methods import REGISTRY, ROUNDING_REGISTRY  # torch-free: --help stays instant

    p.add_argument("--method", choices=tuple(REGISTRY), default="aqas",
                   help="how smoothing scales, clips and activation modes are chosen. " + _choices_help(REGISTRY, "aqas"))
    p.add_argument("--rounding", choices=tuple(ROUNDING_REGISTRY), default="rtn",
                   help="how weights are rounded onto the 4-bit table after the method's scales, composable with any "
                        "--method. " + _choices_help(ROUNDING_REGISTRY, "rtn"))
    p.add_argument("--rotate", choices=("none", "hadamard"), default="none",
                   help="offline rotation folded into a float copy before calibration (docs/calibrate.md#rotation): "
                        "hadamard = random-sign Hadamard on the residual stream (norms folded; not on Gemma3's "
                        "post-norm layout) and per head between v_proj and o_proj (default none)")
    p.add_argument("--format", default="dint4-a", help="4-bit weight format: int4, fp4, dint4-a (default), dint4-b, dint4-c")
    p.add_argument("--group-size", type=int, default=None,
                   help="weight group size, -1 = per output channel (default: -1; fptq: 128, else the largest of 64/32 dividing every K)")
    p.add_argument("--scale-scheme", choices=("float", "two-level"), default="float",
                   help="group scales: float (default), or two-level = integer multiplier x per-channel float, "
                        "so each layer runs as ONE int8 GEMM (needs --group-size)")
    p.add_argument("--act", dest="act_mode", choices=("per-token", "per-tensor"), default="per-token",
                   help="INT8 activations: per-token dynamic (default) or per-tensor static (calibrated scale); fptq decides per layer")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seq-len", type=int, default=None, help="calibration window length in tokens (default 512)")
    length.add_argument("--target-task", default=None,
                        help="SLAC: calibrate at the measured typical input length of this task (see --list-tasks)")
    length.add_argument("--target-len", type=int, default=None,
                        help="SLAC with a known target input length: prints the range-vs-length curve, calibrates at N")
    p.add_argument("--dataset", default="c4", help="c4 (default), ptb (train split), wiki, or a path to .txt / .jsonl ('text' field)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--alpha-grid", type=_floats, default=None, help="AQAS/AWQ alpha grid, comma separated (default 0,0.05,...,1)")
    p.add_argument("--alpha-search", choices=("coarse-to-fine", "full"), default="coarse-to-fine",
                   help="every other alpha then the best one's neighbours (default), or the full grid")
    p.add_argument("--clip-grid", type=_floats, default=None, help="weight clip ratios searched per output channel (default 1,0.95,...,0.7)")
    p.add_argument("--search-tokens", type=int, default=1024, help="tokens the AQAS/AWQ search losses see (default 1024)")
    p.add_argument("--gptq-hessian-inputs", choices=("quantized", "float"), default="quantized",
                   help="--rounding gptq: Hessian from the inputs as the kernel sees them, INT8-quantized (default) "
                        "or the smoothed float inputs")
    p.add_argument("--gptq-damp", type=float, default=0.1, help="--rounding gptq: dampening, fraction of mean diag(H) (default 0.1)")
    p.add_argument("--gptq-block-size", type=int, default=128, help="--rounding gptq: columns per lazy-update block (default 128)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="--rounding gptq: visit columns by decreasing diag(H) (groups stay static and contiguous)")
    p.add_argument("--propagate", choices=("quantized", "float"), default="quantized",
                   help="inputs of layer i+1: outputs of the quantized layer i (default) or of the float one")
    p.add_argument("--max-layers", type=int, default=None, help="quantize only the first N decoder layers (the rest stay float)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu); weights stream from disk")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the run (default: torch's); 1 is often fastest on a busy 2-core machine")
    p.add_argument("--slac-layers", type=int, default=4, help="float layers measured for the SLAC range-vs-length curve (0: skip)")
    p.add_argument("--list-tasks", action="store_true", help="print the measured task -> input length table and exit")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directory (off by default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def _config(args: argparse.Namespace):
    from .recipe import ALPHA_GRID, CLIP_GRID, CalibrationConfig

    return CalibrationConfig(
        method=args.method, rounding=args.rounding, format=args.format, group_size=args.group_size, act_mode=args.act_mode,
        scale_scheme=args.scale_scheme,
        dataset=args.dataset, samples=args.samples, seq_len=args.seq_len if args.seq_len is not None else args.target_len,
        target_task=args.target_task, seed=args.seed, alpha_grid=args.alpha_grid or ALPHA_GRID, alpha_search=args.alpha_search,
        clip_grid=args.clip_grid or CLIP_GRID, search_tokens=args.search_tokens, smoothquant_alpha=args.alpha,
        gptq_hessian_inputs=args.gptq_hessian_inputs, gptq_damp=args.gptq_damp, gptq_block_size=args.gptq_block_size,
        gptq_act_order=args.gptq_act_order, propagate=args.propagate, max_layers=args.max_layers, device=args.device, num_threads=args.threads,
        trust_remote_code=args.trust_remote_code, progress=not args.quiet, overwrite=args.overwrite,
    )


def _slac_report(args, cfg, model_dir) -> None:
    from transformers import AutoTokenizer

    from .slac import activation_range_vs_length, format_curve, format_task_table, task_length_table

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    print(format_task_table(task_length_table(tok), cfg.target_task), file=sys.stderr)
    if args.slac_layers > 0:
        rows = activation_range_vs_length(model_dir, tok, dataset=cfg.dataset, num_layers=args.slac_layers,
                                          seed=cfg.seed, device=cfg.device or "cpu")
        print(format_curve(rows, args.slac_layers), file=sys.stderr)
    print("SLAC: static INT8 ranges and the AQAS loss are fitted to the calibration windows, so they are "
          "drawn at the target's length.", file=sys.stderr)


def _checked_model_dir(args, cfg):
    """The SLAC report streams float layers: refuse a bad --out or dataset before it, as calibrate would."""
    from pathlib import Path

    from . import preflight
    from .api import resolve_model_dir

    out = Path(args.out).resolve()
    preflight.check_output(out, cfg.overwrite)
    preflight.check_dataset(cfg.dataset)
    model_dir = resolve_model_dir(args.model)
    preflight.check_output_vs_source(out, model_dir)
    return model_dir


def run(args: argparse.Namespace) -> int:
    from w4a8_dint.embedded import DataUnavailable
    from w4a8_dint.formats import FormatError

    from .api import calibrate, resolve_model_dir
    from .arch import UnsupportedArchitecture
    from .data import CalibrationDataError
    from .preflight import Interrupted
    from .recipe import RecipeError
    from .rotate import RotationError
    from .slac import UnknownTask
    from .stream import CalibrationError

    try:
        if args.list_tasks:
            from transformers import AutoTokenizer

            from .slac import format_task_table, task_length_table

            tok = AutoTokenizer.from_pretrained(resolve_model_dir(args.model), trust_remote_code=args.trust_remote_code)
            print(format_task_table(task_length_table(tok)))
            return 0
        if not args.out:
            print("error: --out DIR is required", file=sys.stderr)
            return 2
        cfg = _config(args)
        if (args.target_task or args.target_len) and not args.quiet:
            _slac_report(args, cfg, _checked_model_dir(args, cfg))
        out = calibrate(args.model, args.out, cfg, rotate=args.rotate)
    except (RecipeError, FormatError, UnsupportedArchitecture, CalibrationError, CalibrationDataError, UnknownTask,
            DataUnavailable, FileExistsError, RotationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"error: {e}; temp files removed, nothing written", file=sys.stderr)
        return 128 + e.signum
    from w4a8_dint.checkpoint import read_qconfig

    q = read_qconfig(out)
    errs = [v["layer_rel_error"] for v in q.calibration["layers"].values() if "layer_rel_error" in v]
    modes: dict[str, int] = {}
    for pol in q.layers.values():
        modes[pol.act_mode] = modes.get(pol.act_mode, 0) + 1
    print(json.dumps({"out": str(out), "method": q.method, "rounding": q.rounding, "format": q.format, "group_size": q.group_size,
                      "seq_len": q.calibration["seq_len"], "samples": q.calibration["samples"],
                      "quantized_linears": len(q.layers), "act_modes": modes,
                      "mean_layer_rel_error": round(sum(errs) / len(errs), 5) if errs else None}))
    return 0
