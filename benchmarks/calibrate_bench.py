"""Calibration cost and quality per method on SmolLM2-135M and Gemma3-270m (all decoder layers).

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

``--models smollm2,gemma3`` benchmarks both offline models (``w4a8_dint.embedded``). With ``--peer``, and
llm-compressor installed where ``benchmarks/peer_llmcompressor.py`` installs it, the peer's RTN and GPTQ
run on the same calibration windows through that script's ``run_job`` (its own process, peak RSS,
wall and CPU of ``oneshot`` alone: the model is loaded before its clock starts, ours includes loading);
without ``--peer`` the table shows the peer rows that script already recorded for the same model and
granularity (``benchmarks/results/peer_llmcompressor.json``, with their own load averages).

Usage: ``python benchmarks/calibrate_bench.py [--models smollm2,gemma3] [--methods rtn,aqas] [--acts per-token] [--group-size 64] [--peer]``
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


MODELS = ("smollm2", "gemma3")


def _model_dir(name: str) -> Path:
    """``smollm2`` / ``gemma3`` (the offline models the package ships) or a local HF directory."""
    from w4a8_dint.embedded import embedded_model_dir, gemma3_model_dir

    return Path({"smollm2": embedded_model_dir, "gemma3": gemma3_model_dir}.get(name, lambda: name)())


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "load-full":  # the floor of a non-streaming calibrator: whole model + one pass over the data
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from w4a8_dint.calibrate.data import calibration_data
        t = time.perf_counter()
        src = _model_dir(args.model)
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
        prof.runcall(calibrate, _model_dir(args.model), args.out, cfg)
        if os.environ.get("CALIBRATE_PROFILE_DUMP"):
            prof.dump_stats(os.environ["CALIBRATE_PROFILE_DUMP"])
        extra = {"profile_cpu_s_per_layer": _profile_summary(prof, args.profile), "profile_layers": args.profile}
    else:
        calibrate(_model_dir(args.model), args.out, cfg)
        extra = {}
    print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": _cpu_s() - c, "peak_rss_mb": _rss_mb(), **before_write,
                      "loadavg_start": load, "loadavg_end": os.getloadavg(), **extra}))


def _spawn(args: argparse.Namespace, job: str, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", job, "--model", args.model, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
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
    p.add_argument("--models", default="smollm2", help=f"comma-separated: {', '.join(MODELS)} or local HF dirs (default: smollm2)")
    p.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)  # the worker's one model
    p.add_argument("--methods", default="rtn,smoothquant,awq,aqas,fptq")
    p.add_argument("--acts", default="per-token,per-tensor", help="act modes for the non-FPTQ methods")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--search-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: each method's own)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile a calibration of the first N layers instead")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and layer errors (cost rows only)")
    p.add_argument("--peer", action="store_true",
                   help="also run llm-compressor's RTN and GPTQ on the same windows (needs its install, see peer_llmcompressor.py)")
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

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    result = _load_results()
    rows = []
    for model in args.models.split(","):
        args.model = model
        rows += bench_model(args, result)
    result.update({
        "benchmark": "calibrate_bench",
        "model": "rows carry 'model' (smollm2 = SmolLM2-135M-Instruct, embedded, fp32, 30 layers; gemma3 = Gemma3-270m, "
                 "18 layers); rows without it are SmolLM2",
        "setting": {"format": "dint4-a", "group_size": "per row ('group_size'; null: the method's default: -1, fptq: 64)",
                    "dataset": "c4 (second half)", "search_tokens": args.search_tokens,
                    "eval": f"PTB test, first {args.eval_tokens} tokens, seqlen 512; layer error on 4x256 held-out PTB tokens, exact reference kernel",
                    "cost": "wall_s, cpu_s (user + system, all threads) and peak RSS of the calibration process; loadavg around each run",
                    "peer": "llm-compressor rows: wall/CPU of oneshot() only (model loaded before the clock), peak RSS of its process"},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "torch": torch.__version__, "python": platform.python_version()},
    })
    latest = _load_results()  # keep what other invocations (profiles, ablations) wrote meanwhile
    result = {**latest, **{k: v for k, v in result.items() if k not in ("profiles", "ablations")}}
    result["runs"] = _merge(latest.get("runs", []), rows)
    _write_results(result)
    print(f"\ndint4-a, {args.samples} x {args.seq_len} C4 tokens, {args.threads} thread(s), "
          f"load avg {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'model':8s} {'method':16s} {'act':10s} {'group':>6s} {'wall s':>8s} {'CPU s':>8s} {'RSS calib MB':>13s} "
          f"{'RSS peak MB':>12s} {'PTB ppl':>9s} {'layer err':>10s} {'load':>6s}")
    shown = rows + _peer_rows(args, rows)
    for r in shown:
        calib_rss = r.get("peak_rss_calibration_mb", r["peak_rss_mb"])
        load = (r.get("loadavg_start") or [float("nan")])[0]
        print(f"{r.get('model', 'smollm2'):8s} {r['method']:16s} {r['act']:10s} {str(r['group_size']):>6s} {r['wall_s']:8.1f} "
              f"{r['cpu_s']:8.1f} {calib_rss:13.0f} {r['peak_rss_mb']:12.0f} {r.get('ppl_ptb', float('nan')):9.2f} "
              f"{r.get('layer_err_mean', float('nan')):10.4f} {float(load):6.1f}")
    print("RSS calib: high-water mark before the checkpoint writer runs; RSS peak: including the writer + validation. "
          "llm-compressor rows: oneshot() only; 'recorded' = read from peer_llmcompressor.json, not run now")
    print(f"wrote {RESULTS}")


def bench_model(args: argparse.Namespace, result: dict) -> list[dict]:
    """Every method x act of one model, each calibration in its own process (+ the peer's with ``--peer``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w4a8_dint.calibrate.verify import fake_quant_model, layer_errors, perplexity
    from w4a8_dint.embedded import ptb_text

    src = _model_dir(args.model)
    n_layers = json.loads((src / "config.json").read_text()).get("num_hidden_layers") or \
        json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    jobs = [f"{m}:{a}" for m in args.methods.split(",") if m != "fptq" for a in args.acts.split(",")]
    if "fptq" in args.methods.split(","):
        jobs.append("fptq:per-token")  # FPTQ picks the activation mode per layer itself
    # verify.perplexity adds no BOS: the float-simulation perplexity is only meaningful for SmolLM2 (Gemma3 needs
    # BOS per window; its accuracy is in peer_llmcompressor.json / benchmarks/accuracy.md)
    evaluate = not args.no_eval and args.model == "smollm2"
    if evaluate:
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
            print(f"calibrating {args.model} {job} ...", file=sys.stderr, flush=True)
            cost = _spawn(args, job, out)
            row = {"model": args.model, "method": method, "act": act if method != "fptq" else "per-layer",
                   "group_size": args.group_size, "samples": args.samples, "seq_len": args.seq_len, "threads": args.threads,
                   "label": args.label, **cost}
            if evaluate:
                errs = layer_errors(src, out, layer_ids, n_layers, exact=True)
                row.update(ppl_ptb=perplexity(fake_quant_model(out, src), ptb, 512, args.eval_tokens),
                           layer_err_mean=sum(errs) / len(errs), layer_err=errs)
            rows.append(row)
            print(f"  {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)
    if args.peer:
        rows += run_peer(args)
    return rows


def _peer_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_llmcompressor

    return peer_llmcompressor


def run_peer(args: argparse.Namespace) -> list[dict]:
    """llm-compressor's RTN and GPTQ on our windows via peer_llmcompressor.run_job (skipped when not installed)."""
    peer = _peer_module()
    target = peer.peer_dir()
    if not (target / "llmcompressor").is_dir():
        print(f"llm-compressor not installed at {target} (python benchmarks/peer_llmcompressor.py installs it): "
              "peer rows skipped", file=sys.stderr)
        return []
    rows = []
    group = -1 if args.group_size is None else args.group_size
    for recipe in ("rtn", "gptq"):
        job = {"model": str(_model_dir(args.model)), "recipe": recipe, "group_size": group, "dataset": "c4",
               "samples": args.samples, "seq_len": args.seq_len, "seed": 0, "eval_seq_len": 512, "eval_tokens": args.eval_tokens,
               "datasets": ["ptb"], "add_bos": args.model == "gemma3", "threads": args.threads, "acts_off_check": False}
        print(f"llm-compressor {args.model} {recipe} ...", file=sys.stderr, flush=True)
        load = os.getloadavg()
        res = peer.run_job(job, target)
        if "error" in res:
            print(f"  failed: {res['error']}", file=sys.stderr)
            continue
        rows.append({"model": args.model, "method": f"llmcompressor-{recipe}", "act": "per-token", "group_size": args.group_size,
                     "samples": args.samples, "seq_len": args.seq_len, "threads": args.threads, "label": args.label,
                     "wall_s": res["calib_wall_s"], "cpu_s": res["calib_cpu_s"], "peak_rss_mb": res["peak_rss_mb"],
                     "loadavg_start": load, "loadavg_end": os.getloadavg(), "ppl_ptb_peer_harness": res["ppl"].get("ptb")})
    return rows


def _peer_rows(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Peer RTN/GPTQ rows recorded by peer_llmcompressor.py for the models and granularity of this run (display only)."""
    if args.peer:
        return []
    path = Path(__file__).resolve().parent / "results" / "peer_llmcompressor.json"
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []
    group = -1 if args.group_size is None else args.group_size
    out = []
    for model in dict.fromkeys(r.get("model", "smollm2") for r in rows):
        for recipe in ("rtn", "gptq"):
            r = runs.get(f"{model}|g{group}|{recipe}", {})
            res = r.get("result", {})
            if "calib_wall_s" not in res:
                continue
            out.append({"model": model, "method": f"llmcompressor-{recipe}", "act": "recorded", "group_size": group,
                        "wall_s": res["calib_wall_s"], "cpu_s": res["calib_cpu_s"], "peak_rss_mb": res["peak_rss_mb"],
                        "loadavg_start": [float(x) for x in r.get("loadavg", ["nan"])]})
    return out


def _row_key(r: dict) -> tuple:
    # rows written before group_size/samples/threads were recorded ran with the file's old setting: per channel, 16 x 512, 1 thread
    return (r.get("model", "smollm2"), r["method"], r["act"], r.get("group_size"), r.get("samples", 16), r.get("seq_len", 512),
            r.get("threads", 1), r.get("label", ""))


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
