"""HF Transformers CPU forward speed: W4A8 checkpoints vs the float32 model, side by side in one process.

The workload is a perplexity-style forward: one batch of ``B`` x ``L`` real-text tokens (PTB test,
default 4 x 512), ``torch.no_grad()``, float32 activations, logits for every position. Every model
is loaded once; the models then run in rounds with the order rotating every round, so load from
other work on the machine hits all of them alike. Reported per model: median wall seconds and CPU
seconds per forward, tokens/s, and the ratio to float32 (target: the W4A8 checkpoints are no slower).

Models (``--models``, comma list): ``fp32`` (the float model), ``ours-pc`` (per channel) and
``ours-g64-2l`` (group 64, two-level scales), the RTN checkpoints of ``benchmarks/peer_checkpoints.py``;
``NAME@KERNEL`` runs one with our kernel ``KERNEL`` (``prepare_kernels(prefer=KERNEL)``).

Usage: python benchmarks/hf_forward_bench.py [--model smollm2|gemma3] [--rounds 5] [--threads 1]
Results: merged into benchmarks/results/hf_forward_bench.json under ``runs["<model>|t<threads>"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "hf_forward_bench.json"
DEFAULT_MODELS = "fp32,ours-pc,ours-g64-2l"


def rotate(names: list[str], rnd: int) -> list[str]:
    k = rnd % len(names)
    return names[k:] + names[:k]


def load_models(base: Path, names: list[str]) -> dict:
    """name -> (model, kernel names used by its W4A8 layers)."""
    import torch

    import peer_checkpoints
    from w4a8_dint.hf_integration.eval import load_hf
    from w4a8_dint.hf_integration.modules import W4A8Linear, prepare_kernels

    ckpts = peer_checkpoints.make_checkpoints(base, sorted({n.partition("@")[0] for n in names} - {"fp32"}))
    models = {}
    for name in names:
        kind, _, kernel = name.partition("@")
        model, _ = load_hf(base if kind == "fp32" else ckpts[kind], "float32")
        if kernel:
            prepare_kernels(model, prefer=kernel)
        with torch.no_grad():  # first forward builds the kernel state (int8 expansion, oneDNN handles)
            model(torch.zeros(1, 8, dtype=torch.long))
        used = sorted({m.kernel_name for m in model.modules() if isinstance(m, W4A8Linear)})
        models[name] = (model, used)
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 or an HF model dir")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list (default {DEFAULT_MODELS})")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core box a 2-thread GEMM waits for a descheduled thread)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch
    from transformers import AutoTokenizer

    from peer_llmcompressor import _model_path
    from w4a8_dint.embedded import ptb_text

    torch.set_num_threads(args.threads)
    base = Path(_model_path(args.model))
    model_name = args.model if args.model in ("smollm2", "gemma3") else base.name
    names = [n for n in args.models.split(",") if n]
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(ptb_text("test")[: 12 * args.batch * args.seq_len]).input_ids
    need = args.batch * args.seq_len
    if len(ids) < need:
        raise RuntimeError("not enough text")
    x = torch.tensor(ids[:need]).reshape(args.batch, args.seq_len)
    if tok.bos_token_id is not None and args.model == "gemma3":  # Gemma3 needs BOS (as its perplexity does)
        x[:, 0] = tok.bos_token_id
    models = load_models(base, names)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rounds_meta = []
    ref_logits = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        meta = {"round": rnd, "order": rotate(names, rnd), "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
        for n in meta["order"]:
            model = models[n][0]
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                logits = model(x).logits
                w, c = time.perf_counter() - t0, time.process_time() - c0
            if rnd == 0:
                ref_logits[n] = logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).mean().item()
                continue
            wall[n].append(w)
            cpu[n].append(c)
        meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        rounds_meta.append(meta)
        print(f"round {rnd}/{args.rounds}: " + ", ".join(f"{n} {wall[n][-1]:.2f}s" for n in names if wall[n]),
              flush=True)
    tokens = args.batch * args.seq_len
    rows = {}
    base_wall = statistics.median(wall["fp32"]) if "fp32" in wall else None
    base_cpu = statistics.median(cpu["fp32"]) if "fp32" in cpu else None
    for n in names:
        mw, mc = statistics.median(wall[n]), statistics.median(cpu[n])
        rows[n] = {"kernels": models[n][1], "wall_s": round(mw, 3), "cpu_s": round(mc, 3),
                   "tokens_per_s": round(tokens / mw, 1),
                   "speed_vs_fp32_wall": round(base_wall / mw, 3) if base_wall else None,
                   "speed_vs_fp32_cpu": round(base_cpu / mc, 3) if base_cpu else None,
                   "mean_token_logprob": round(ref_logits[n], 4),
                   "rounds_wall_s": [round(v, 3) for v in wall[n]], "rounds_cpu_s": [round(v, 3) for v in cpu[n]]}
    print(f"\n| model | kernels | wall s | CPU s | tok/s | speed vs fp32 (wall) | (CPU) |\n|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {','.join(r['kernels']) or 'float'} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['speed_vs_fp32_wall']}x | {r['speed_vs_fp32_cpu']}x |")
    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model_dir": str(base), "threads": args.threads,
           "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds, "activations": "float32",
           "target": "every W4A8 model speed_vs_fp32 >= 1.0",
           "targets_met": targets_met(rows),
           "cpu": _cpu(), "torch": torch.__version__, "models": rows, "round_log": rounds_meta}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"benchmark": "hf_forward_bench", "runs": {}}
    doc["runs"][f"{model_name}|t{args.threads}"] = run
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def targets_met(rows: dict) -> dict:
    """Per W4A8 model: no slower than fp32, by wall clock and by CPU seconds (the steadier one on a loaded box)."""
    return {n: {"wall": r["speed_vs_fp32_wall"] >= 1.0, "cpu": r["speed_vs_fp32_cpu"] >= 1.0}
            for n, r in rows.items() if n != "fp32" and r["speed_vs_fp32_wall"] is not None}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
