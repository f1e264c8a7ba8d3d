"""Calibration cost and quality per method on the embedded SmolLM2-135M (all 30 layers).

Each calibration runs in its own process so its peak RSS (``ru_maxrss``) is its own. For
reference, one more process only loads the whole float model with ``from_pretrained``. Then,
side by side in this process, on held-out PTB *test* text (calibration reads C4):

* layer error: each decoder layer rebuilt from the checkpoint and run with the exact integer
  W4A8 reference kernel on the float model's inputs, ``||y_q - y||^2 / ||y - x||^2``;
* perplexity of the fake-quant model (every quantized layer simulated in float), seqlen 512.

Every row has wall time, CPU time (user + system, all threads) and peak RSS of its calibration
process, and the load average around it (the box may be shared). Rows are merged into the
results file by ``(method, act, group_size, samples, seq_len, threads)``; other rows are kept.

``--profile N`` instead runs one calibration of the first N layers under cProfile with a CPU-time
clock and prints where each layer's CPU time goes (forward passes, candidate evaluation, weight
and activation fake-quant, clip search); ``--no-eval`` skips perplexity and layer errors.

Usage: ``python benchmarks/calibrate_bench.py [--methods rtn,aqas] [--acts per-token,per-tensor] [--group-size 64]``
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


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# Profile categories: (label, file suffix, function name, only when called from this file or None);
# cumulative CPU time of each, per layer. Indented rows are part of the row above.
PROFILE_PARTS = (
    ("layer total", "calibrate/layer.py", "calibrate", None),
    ("forward passes (capture + propagate)", "calibrate/stream.py", "__call__", None),
    ("  capture (float pass, statistics)", "calibrate/layer.py", "capture", None),
    ("candidate evaluation (alpha search)", "calibrate/search.py", "search_scale", None),
    ("  block forwards (attention, MLP)", "calibrate/arch.py", "call_with_input", "calibrate/layer.py"),
    ("clip search", "calibrate/layer.py", "_search_clips", None),
    ("  clip search proper (fake-quant + matmuls)", "calibrate/search.py", "search_row_clip", None),
    ("weight fake-quant (search + clips)", "calibrate/search.py", "fake_quantize_weight", None),
    ("  rounding (lookup, or bucketize before)", "calibrate/search.py", "_round_to_values_", None),
    ("activation fake-quant (all callers)", "calibrate/search.py", "fake_quantize_activation_fast", None),
)


def _profile_summary(prof, layers: int) -> dict[str, float]:
    import pstats

    stats = pstats.Stats(prof).stats
    out = {}
    for label, path, func, caller in PROFILE_PARTS:
        total = 0.0
        for (f, _, name), (_, _, _, cum, callers) in stats.items():
            if f.endswith(path) and name == func:
                total += cum if caller is None else sum(c[3] for k, c in callers.items() if k[0].endswith(caller))
        out[label] = total / layers
    bucketize = sum(v[3] for (f, _, name), v in stats.items() if "bucketize" in name and "fake_quantize_weight" in
                    {k[2] for k in v[4]})  # the old rounding, called straight from fake_quantize_weight
    out["  rounding (lookup, or bucketize before)"] += bucketize / layers
    return out


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
                            search_tokens=args.search_tokens, progress=False, overwrite=True, num_threads=args.threads,
                            group_size=args.group_size, max_layers=args.profile or None)
    load = os.getloadavg()
    t, c = time.perf_counter(), _cpu_s()
    if args.profile:
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU time: on a shared box wall time measures the neighbours
        prof.runcall(calibrate, None, args.out, cfg)
        if os.environ.get("CALIBRATE_PROFILE_DUMP"):
            prof.dump_stats(os.environ["CALIBRATE_PROFILE_DUMP"])
        extra = {"profile_cpu_s_per_layer": _profile_summary(prof, args.profile), "profile_layers": args.profile}
    else:
        calibrate(None, args.out, cfg)
        extra = {}
    print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": _cpu_s() - c, "peak_rss_mb": _rss_mb(), **before_write,
                      "loadavg_start": load, "loadavg_end": os.getloadavg(), **extra}))


def _spawn(args: argparse.Namespace, job: str, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", job, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--search-tokens", str(args.search_tokens), "--threads", str(args.threads), "--profile", str(args.profile)]
    if args.group_size is not None:
        cmd += ["--group-size", str(args.group_size)]
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
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: each method's own)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile a calibration of the first N layers instead")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and layer errors (cost rows only)")
    p.add_argument("--ablate-subset", type=int, default=0, metavar="N",
                   help="compare the alpha-search loss on the whole search batch vs the subset, first N layers")
    p.add_argument("--subset", type=float, default=0.5, help="sequence fraction for --ablate-subset (default 0.5)")
    p.add_argument("--label", default="", help="tag kept with the rows (e.g. the code version measured)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="PTB test tokens for perplexity (windows of 512)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    if args.profile:
        return profile(args)
    if args.ablate_subset:
        return ablate_loss_subset(args)
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
    result = _load_results()
    if not args.no_eval:
        tok = AutoTokenizer.from_pretrained(src)
        ptb = torch.tensor(tok(ptb_text("test")[:200_000])["input_ids"])
        layer_ids = ptb[-1024:].reshape(4, 256)  # held-out text for layer errors (the PPL windows start at the front)
        full = _spawn(args, "load-full")
        fp_ppl = perplexity(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ptb, 512, args.eval_tokens)
        result["float"] = {"ppl_ptb": fp_ppl, "load_full_model": full}
    rows = []
    with tempfile.TemporaryDirectory(prefix="calibrate-bench-") as tmp:
        for job in jobs:
            method, act = job.split(":")
            out = Path(tmp) / job.replace(":", "-")
            print(f"calibrating {job} ...", file=sys.stderr, flush=True)
            cost = _spawn(args, job, out)
            row = {"method": method, "act": act if method != "fptq" else "per-layer", "group_size": args.group_size,
                   "samples": args.samples, "seq_len": args.seq_len, "threads": args.threads, "label": args.label, **cost}
            if not args.no_eval:
                errs = layer_errors(src, out, layer_ids, 30, exact=True)
                row.update(ppl_ptb=perplexity(fake_quant_model(out, src), ptb, 512, args.eval_tokens),
                           layer_err_mean=sum(errs) / len(errs), layer_err=errs)
            rows.append(row)
            print(f"  {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)
    result.update({
        "benchmark": "calibrate_bench",
        "model": "SmolLM2-135M-Instruct (embedded; fp32; 30 layers)",
        "setting": {"format": "dint4-a", "group_size": "per row ('group_size'; null: the method's default: -1, fptq: 64)",
                    "dataset": "c4 (second half)", "search_tokens": args.search_tokens,
                    "eval": f"PTB test, first {args.eval_tokens} tokens, seqlen 512; layer error on 4x256 held-out PTB tokens, exact reference kernel",
                    "cost": "wall_s, cpu_s (user + system, all threads) and peak RSS of the calibration process; loadavg around each run"},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "torch": torch.__version__, "python": platform.python_version()},
    })
    latest = _load_results()  # keep what other invocations (profiles, ablations) wrote meanwhile
    result = {**latest, **{k: v for k, v in result.items() if k not in ("profiles", "ablations")}}
    result["runs"] = _merge(latest.get("runs", []), rows)
    _write_results(result)
    print(f"\nSmolLM2-135M, dint4-a, {args.samples} x {args.seq_len} C4 tokens, {args.threads} thread(s), "
          f"load avg {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'method':12s} {'act':10s} {'group':>6s} {'wall s':>8s} {'CPU s':>8s} {'RSS calib MB':>13s} {'RSS peak MB':>12s} {'PTB ppl':>9s} {'layer err':>10s}")
    for r in rows:
        print(f"{r['method']:12s} {r['act']:10s} {str(r['group_size']):>6s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} "
              f"{r['peak_rss_calibration_mb']:13.0f} {r['peak_rss_mb']:12.0f} {r.get('ppl_ptb', float('nan')):9.2f} "
              f"{r.get('layer_err_mean', float('nan')):10.4f}")
    print("RSS calib: high-water mark before the checkpoint writer runs; RSS peak: including the writer + validation")
    print(f"wrote {RESULTS}")


def _row_key(r: dict) -> tuple:
    # rows written before group_size/samples/threads were recorded ran with the file's old setting: per channel, 16 x 512, 1 thread
    return (r["method"], r["act"], r.get("group_size"), r.get("samples", 16), r.get("seq_len", 512), r.get("threads", 1),
            r.get("label", ""))


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    keys = {_row_key(r) for r in new}
    return [r for r in old if _row_key(r) not in keys] + new


def _load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _write_results(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)


def ablate_loss_subset(args: argparse.Namespace) -> None:
    """Alpha-search loss on all of the search batch vs on ``--subset`` of its sequences, first
    ``--ablate-subset`` layers: chosen (family, alpha) per group, layer errors, CPU time (kept under "ablations")."""
    import torch

    import w4a8_dint.calibrate.layer as layer_mod
    from w4a8_dint.calibrate.api import calibrate
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    torch.set_num_threads(args.threads)
    method, act = args.methods.split(",")[0], args.acts.split(",")[0]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="calibrate-ablate-") as tmp:
        for fraction in (1.0, args.subset):
            layer_mod.SEARCH_LOSS_SUBSET = fraction
            cfg = CalibrationConfig(method=method, act_mode=act, samples=args.samples, seq_len=args.seq_len,
                                    search_tokens=args.search_tokens, progress=False, overwrite=True, num_threads=args.threads,
                                    group_size=args.group_size, max_layers=args.ablate_subset)
            c = _cpu_s()
            out = calibrate(None, Path(tmp) / f"f{fraction}", cfg)
            layers = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["layers"]
            runs[fraction] = {"cpu_s": _cpu_s() - c,
                              "layer_rel_error": [r["layer_rel_error"] for r in layers.values()],
                              "choices": [[g.get("family"), g.get("alpha")] for r in layers.values() for g in r["groups"]]}
    full, sub = runs[1.0], runs[args.subset]
    same = sum(a == b for a, b in zip(full["choices"], sub["choices"]))
    summary = {"subset": args.subset, "layers": args.ablate_subset, "full": full, "subset_run": sub,
               "same_choices": f"{same}/{len(full['choices'])}",
               "mean_layer_rel_error": [sum(r["layer_rel_error"]) / len(r["layer_rel_error"]) for r in (full, sub)]}
    result = _load_results()
    result.setdefault("ablations", {})[f"loss_subset:{method}:{act}:g{args.group_size}:{args.samples}x{args.seq_len}"] = summary
    _write_results(result)
    print(json.dumps(summary, indent=1))


def profile(args: argparse.Namespace) -> None:
    """Per-layer CPU-time breakdown of one method on the first ``--profile`` layers (kept under "profiles")."""
    method = args.methods.split(",")[0]
    act = args.acts.split(",")[0]
    with tempfile.TemporaryDirectory(prefix="calibrate-profile-") as tmp:
        cost = _spawn(args, f"{method}:{act}", Path(tmp) / "out")
    parts = cost.pop("profile_cpu_s_per_layer")
    key = f"{method}:{act}:g{args.group_size}:{args.samples}x{args.seq_len}:{args.profile}layers:{args.threads}t:{args.label}"
    result = _load_results()
    result.setdefault("profiles", {})[key] = {"cpu_s_per_layer": parts, **cost}
    _write_results(result)
    print(json.dumps({"profile": key, **result["profiles"][key]}))
    print(f"{key}: {cost['wall_s']:.1f} s wall, {cost['cpu_s']:.1f} s CPU (whole process), load {cost['loadavg_start'][0]:.1f}")
    for label, v in parts.items():
        print(f"  {label:40s} {v:7.2f} s/layer")


if __name__ == "__main__":
    main()
