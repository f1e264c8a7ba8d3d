"""Calibration cost and quality per method on the embedded SmolLM2-135M (all 30 layers).

Each calibration runs in its own process so its peak RSS (``ru_maxrss``) is its own. For
reference, one more process only loads the whole float model with ``from_pretrained``. Then,
side by side in this process, on held-out PTB *test* text (calibration reads C4):

* layer error: each decoder layer rebuilt from the checkpoint and run with the exact integer
  W4A8 reference kernel on the float model's inputs, ``||y_q - y||^2 / ||y - x||^2``;
* perplexity of the fake-quant model (every quantized layer simulated in float), seqlen 512.

Usage: ``python benchmarks/calibrate_bench.py [--methods rtn,aqas] [--acts per-token,per-tensor]``
Prints a table and writes ``benchmarks/results/calibrate_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "calibrate_bench.json"


def _rss_mb() -> float:
    """Peak RSS of this process (``VmHWM``). Not ``ru_maxrss``: Linux carries the parent's high-water
    mark into a forked-and-exec'd child, so a worker spawned by a big parent would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "load-full":  # the floor of a non-streaming calibrator: whole model + one pass over the data
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from w4a8_dint.calibrate.data import calibration_data
        from w4a8_dint.embedded import embedded_model_dir

        t = time.perf_counter()
        src = embedded_model_dir()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        data = calibration_data(AutoTokenizer.from_pretrained(src), "c4", args.samples, args.seq_len, 0)
        with torch.no_grad():
            for ids in data.input_ids.split(2):
                model(input_ids=ids)
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": _rss_mb(), "params": n,
                          "fp32_weights_mb": n * 4 / 2**20}))
        return
    import w4a8_dint.calibrate.api as api
    from w4a8_dint.calibrate.api import calibrate
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    before_write: dict[str, float] = {}
    write = api.write_checkpoint

    def write_and_note(*a, **k):  # RSS high-water mark of the calibration itself, before the writer runs
        before_write["peak_rss_calibration_mb"] = _rss_mb()
        return write(*a, **k)

    api.write_checkpoint = write_and_note

    method, act = args.worker.split(":")
    cfg = CalibrationConfig(method=method, act_mode=act, samples=args.samples, seq_len=args.seq_len,
                            search_tokens=args.search_tokens, progress=False, overwrite=True, num_threads=args.threads)
    t = time.perf_counter()
    calibrate(None, args.out, cfg)
    print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": _rss_mb(), **before_write}))


def _spawn(args: argparse.Namespace, job: str, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", job, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--search-tokens", str(args.search_tokens), "--threads", str(args.threads)]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rtn,smoothquant,awq,aqas,fptq")
    p.add_argument("--acts", default="per-token,per-tensor", help="act modes for the non-FPTQ methods")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--search-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=4096, help="PTB test tokens for perplexity (windows of 512)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w4a8_dint.calibrate.verify import fake_quant_model, layer_errors, perplexity
    from w4a8_dint.embedded import embedded_model_dir, ptb_text

    torch.set_num_threads(args.threads)
    src = embedded_model_dir()
    load_start = os.getloadavg()
    jobs = [f"{m}:{a}" for m in args.methods.split(",") if m != "fptq" for a in args.acts.split(",")]
    if "fptq" in args.methods.split(","):
        jobs.append("fptq:per-token")  # FPTQ picks the activation mode per layer itself
    tok = AutoTokenizer.from_pretrained(src)
    ptb = torch.tensor(tok(ptb_text("test")[:200_000])["input_ids"])
    layer_ids = ptb[-1024:].reshape(4, 256)  # held-out text for layer errors (the PPL windows start at the front)
    full = _spawn(args, "load-full")
    fp_ppl = perplexity(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ptb, 512, args.eval_tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="calibrate-bench-") as tmp:
        for job in jobs:
            method, act = job.split(":")
            out = Path(tmp) / job.replace(":", "-")
            print(f"calibrating {job} ...", file=sys.stderr, flush=True)
            cost = _spawn(args, job, out)
            errs = layer_errors(src, out, layer_ids, 30, exact=True)
            ppl = perplexity(fake_quant_model(out, src), ptb, 512, args.eval_tokens)
            rows.append({"method": method, "act": act if method != "fptq" else "per-layer", **cost, "ppl_ptb": ppl,
                         "layer_err_mean": sum(errs) / len(errs), "layer_err": errs})
            print(f"  {rows[-1]['wall_s']:.0f} s, ppl {ppl:.2f}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "calibrate_bench",
        "model": "SmolLM2-135M-Instruct (embedded; fp32; 30 layers)",
        "setting": {"format": "dint4-a", "group_size": "-1 (per channel); fptq: 64", "dataset": "c4 (second half)",
                    "samples": args.samples, "seq_len": args.seq_len, "search_tokens": args.search_tokens,
                    "eval": f"PTB test, first {args.eval_tokens} tokens, seqlen 512; layer error on 4x256 held-out PTB tokens, exact reference kernel"},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version()},
        "float": {"ppl_ptb": fp_ppl, "load_full_model": full},
        "runs": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSmolLM2-135M, dint4-a, {args.samples} x {args.seq_len} C4 tokens, {args.threads} thread(s), "
          f"load avg {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'method':12s} {'act':10s} {'wall s':>8s} {'RSS calib MB':>13s} {'RSS peak MB':>12s} {'PTB ppl':>9s} {'layer err':>10s}")
    print(f"{'float':12s} {'-':10s} {'-':>8s} {full['peak_rss_mb']:13.0f} {'-':>12s} {fp_ppl:9.2f} {'-':>10s}"
          "  (RSS: whole model loaded + one pass over the calibration data)")
    for r in rows:
        print(f"{r['method']:12s} {r['act']:10s} {r['wall_s']:8.1f} {r['peak_rss_calibration_mb']:13.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['ppl_ptb']:9.2f} {r['layer_err_mean']:10.4f}")
    print("RSS calib: high-water mark before the checkpoint writer runs; RSS peak: including the writer + validation")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
