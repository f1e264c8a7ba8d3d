"""Accuracy study: W4A8 methods x 4-bit formats on the embedded SmolLM2-135M (all 30 decoder layers
quantized), group-wise g64 + FPTQ, SLAC, the dINT-table ablation, zero-shot tasks and the AQAS family
ablation.

One command regenerates everything from cached runs (each run = calibrate -> evaluate -> keep a JSON
under ``benchmarks/results/accuracy_runs/`` keyed by its settings; a re-run skips every cached key)::

    python benchmarks/accuracy.py --jobs 2         # the study (resumes), then report + plots
    python benchmarks/accuracy.py --only main,g64  # some parts: main, g64, slac, dint, zeroshot, family, noise, static
    python benchmarks/accuracy.py --report-only    # rebuild accuracy.md / .json / PNGs from the cache
    python benchmarks/accuracy.py --quick          # CI size: rtn vs aqas, int4, 1 layer, 1k tokens

Outputs: ``benchmarks/results/accuracy.json``, ``benchmarks/accuracy.md``,
``benchmarks/results/accuracy_*.png`` (``--quick``: ``accuracy_quick.json`` only).

Parts are listed (and computed) in priority order, so a study stopped early has the important
runs. ``--jobs N`` runs the missing runs in N worker processes (one fresh process per run, one
torch thread each), started in that order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub at run time

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPORT_MD = BENCH_DIR / "accuracy.md"
# Checkpoints that a later run re-evaluates (zero-shot on a main-table calibration) wait here.
CKPT_DIR = Path(tempfile.gettempdir()) / "w4a8-accuracy-ckpts"

MAIN_METHODS = ("rtn", "smoothquant", "awq", "aqas")
MAIN_FORMATS = ("int4", "fp4", "dint4-a")
DINT_FORMATS = ("dint4-a", "dint4-b", "dint4-c")
G64_METHODS = ("rtn", "awq", "aqas")
G64_FORMATS = ("int4", "fp4", "dint4-a")
ZS_METHODS = ("rtn", "smoothquant", "awq", "aqas")
PPL_SETS = ("ptb", "c4")
EVAL_KINDS = ("ppl", "slac", "zeroshot", "range")
# FPTQ without LAE: v0 = v1 = 150 makes every layer with max|X| < 150 per-tensor static *without* LAE and
# leaves the > 150 layers per-token, so only the 15..150 band ("intractable" layers) differs from the default.
NO_LAE_BOUNDS = (150.0, 150.0)
TOTAL_LAYERS = 30  # SmolLM2-135M
STATIC_LEN = 512  # calibration window of the static-activation method comparison


@dataclass(frozen=True)
class StudySettings:
    """What every run of one study shares (the relevant fields are part of each run's cache key)."""

    max_layers: int | None = None  # None: every decoder layer quantized; N: the first N (quick mode)
    samples: int = 4  # calibration windows of C4 (CPU budget; the recipe default is 32)
    seq_len: int = 512
    search_tokens: int = 512  # tokens the AQAS/AWQ losses see (recipe: 1024)
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # coarse grid (budget); recipe default is 0.05 steps
    clip_grid: tuple[float, ...] = (1.0, 0.9, 0.8)  # recipe: 1.0 .. 0.7
    ppl_tokens: int = 4096  # per dataset, seq 512, non-overlapping windows
    ppl_sets: tuple[str, ...] = PPL_SETS
    seed: int = 0
    # SLAC: calibration lengths at a fixed calibration token count, each scored at a short and a long window
    slac_lengths: tuple[int, ...] = (64, 256, 512, 1024, 2048)
    slac_tokens: int = 4096  # calibration tokens per length (samples = slac_tokens // length)
    slac_eval_lengths: tuple[int, ...] = (64, 2048)
    slac_eval_tokens: int = 4096  # per dataset and eval length
    range_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    range_tokens: int = 4096
    # zero-shot (first zs_limit docs of each task)
    zs_tasks: tuple[str, ...] = ("piqa", "arc_easy", "hellaswag")
    zs_limit: int = 200

    @property
    def layers_text(self) -> str:
        if self.max_layers is None or self.max_layers >= TOTAL_LAYERS:
            return f"all {TOTAL_LAYERS} decoder layers quantized"
        return f"only the first {self.max_layers} of {TOTAL_LAYERS} decoder layers quantized (the rest stay float)"


QUICK = StudySettings(max_layers=1, samples=2, search_tokens=256, ppl_tokens=1024, ppl_sets=("ptb",))


@dataclass(frozen=True)
class RunSpec:
    """One calibration + evaluation. ``method=None`` is the float model."""

    method: str | None
    format: str | None = None
    group_size: int | None = None  # None -> the recipe's default (per channel; FPTQ: 64 on this model)
    scale_families: tuple[str, ...] | None = None
    fptq_bounds: tuple[float, float] | None = None
    act_mode: str = "per-token"
    calib_len: int | None = None  # SLAC: calibration window length (None: study.seq_len, study.samples)
    seed: int | None = None  # None: study.seed
    eval: str = "ppl"  # ppl | slac (short + long windows) | zeroshot | range (float activation ranges)

    def __post_init__(self) -> None:
        if self.eval not in EVAL_KINDS:
            raise ValueError(f"eval must be one of {EVAL_KINDS}, got {self.eval!r}")

    @property
    def label(self) -> str:
        if self.method is None:
            parts = ["fp32"]
        else:
            if self.group_size is None:  # the recipe's default: per channel, FPTQ group-wise (64 here)
                group = "g-default" if self.method == "fptq" else "pc"
            else:
                group = "pc" if self.group_size == -1 else f"g{self.group_size}"
            parts = [self.method, self.format or "default", group]
            if self.act_mode != "per-token":
                parts.append("static" if self.act_mode == "per-tensor" else self.act_mode)
            if self.scale_families:
                parts.append("fam=" + "+".join(self.scale_families))
            if self.fptq_bounds:
                parts.append("v=" + "-".join(f"{b:g}" for b in self.fptq_bounds))
            if self.calib_len:
                parts.append(f"L={self.calib_len}")
            if self.seed is not None:
                parts.append(f"seed={self.seed}")
        if self.eval != "ppl":
            parts.append(f"[{self.eval}]")
        return " ".join(parts)

    def calibration_spec(self) -> "RunSpec":
        """The same calibration with the default evaluation (runs sharing it share a checkpoint)."""
        return RunSpec(**{**asdict(self), "eval": "ppl"})


def calib_settings(spec: RunSpec, study: StudySettings) -> dict[str, Any]:
    """The calibration a run does, resolved (SLAC length, samples, seed)."""
    seq_len = spec.calib_len or study.seq_len
    samples = max(1, study.slac_tokens // spec.calib_len) if spec.calib_len else study.samples
    return {"max_layers": study.max_layers, "samples": samples, "seq_len": seq_len,
            "search_tokens": study.search_tokens, "alpha_grid": list(study.alpha_grid),
            "clip_grid": list(study.clip_grid), "seed": study.seed if spec.seed is None else spec.seed}


def eval_settings(spec: RunSpec, study: StudySettings) -> dict[str, Any]:
    if spec.eval == "ppl":
        return {"kind": "ppl", "sets": list(study.ppl_sets), "tokens": study.ppl_tokens, "seq_lens": [512]}
    if spec.eval == "slac":
        return {"kind": "ppl", "sets": list(study.ppl_sets), "tokens": study.slac_eval_tokens,
                "seq_lens": list(study.slac_eval_lengths)}
    if spec.eval == "zeroshot":
        return {"kind": "zeroshot", "tasks": list(study.zs_tasks), "limit": study.zs_limit}
    return {"kind": "range", "lengths": list(study.range_lengths), "tokens": study.range_tokens, "dataset": "c4"}


def run_key(spec: RunSpec, study: StudySettings) -> dict[str, Any]:
    """Everything that changes a run's numbers (FP runs ignore the calibration fields)."""
    key: dict[str, Any] = {"spec": asdict(spec), "eval": eval_settings(spec, study)}
    if spec.method is not None:
        key["calib"] = calib_settings(spec, study)
    return json.loads(json.dumps(key))  # tuples -> lists, so the hash is stable


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def run_path(spec: RunSpec, study: StudySettings, runs_dir: Path) -> Path:
    slug = spec.label.replace(" ", "_").replace("=", "-").replace("+", "-").replace("[", "").replace("]", "")
    return runs_dir / f"{slug}__{_digest(run_key(spec, study))}.json"


def ckpt_path(spec: RunSpec, study: StudySettings, ckpt_dir: Path) -> Path:
    """Where a kept checkpoint of ``spec``'s calibration lives (same for every eval of it)."""
    k = run_key(spec.calibration_spec(), study)
    return ckpt_dir / _digest({"spec": k["spec"], "calib": k.get("calib")})


# -- one run ------------------------------------------------------------------------------------

def _calibration_record(ckpt: Path) -> dict[str, Any]:
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cal = q.get("calibration", {})
    layers = cal.get("layers", {})
    return {
        "group_size": q.get("group_size"),
        "seq_len": cal.get("seq_len"), "samples": cal.get("samples"), "search_tokens_used": cal.get("search_tokens_used"),
        "layer_rel_error": {k: v.get("layer_rel_error") for k, v in layers.items()},
        "choices": {k: [{g: grp.get(g) for g in ("family", "alpha", "act_mode", "fptq") if g in grp}
                        for grp in v.get("groups", [])] for k, v in layers.items()},
        "notes": cal.get("notes", []),
    }


def _calibrate(spec: RunSpec, study: StudySettings, out: Path, progress: bool) -> None:
    from w4a8_dint.calibrate.api import calibrate
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    c = calib_settings(spec, study)
    optional = {k: v for k, v in (("scale_families", spec.scale_families), ("fptq_bounds", spec.fptq_bounds)) if v}
    cfg = CalibrationConfig(
        method=spec.method, format=spec.format, group_size=spec.group_size, act_mode=spec.act_mode,
        samples=c["samples"], seq_len=c["seq_len"], search_tokens=c["search_tokens"], alpha_grid=tuple(c["alpha_grid"]),
        clip_grid=tuple(c["clip_grid"]), max_layers=c["max_layers"], seed=c["seed"], device="cpu", progress=progress,
        **optional,
    )
    calibrate(None, out, cfg)


def _evaluate(model_dir: Path, spec: RunSpec, study: StudySettings, progress: bool) -> dict[str, Any]:
    from w4a8_dint.hf_integration.eval import EvalSettings, evaluate

    ev = eval_settings(spec, study)
    if ev["kind"] == "zeroshot":
        s = EvalSettings(tasks=tuple(ev["tasks"]), limit=ev["limit"], progress=progress)
        return evaluate(model_dir, settings=s)["results"]
    if ev["kind"] == "range":
        from transformers import AutoTokenizer

        from w4a8_dint.calibrate.slac import activation_range_vs_length

        rows = activation_range_vs_length(model_dir, AutoTokenizer.from_pretrained(model_dir), tuple(ev["lengths"]),
                                          dataset=ev["dataset"], token_budget=ev["tokens"], num_layers=TOTAL_LAYERS)
        return {"range_vs_length": rows}
    results: dict[str, Any] = {}
    for L in ev["seq_lens"]:
        s = EvalSettings(tasks=tuple(ev["sets"]), max_tokens=ev["tokens"], seq_len=L, progress=progress)
        r = evaluate(model_dir, settings=s)["results"]
        results.update(r if ev["seq_lens"] == [512] and spec.eval == "ppl" else {f"{d}@{L}": v for d, v in r.items()})
    return results


def execute(spec: RunSpec, study: StudySettings, progress: bool, ckpt_dir: Path | None = None) -> dict[str, Any]:
    """Calibrate (unless FP; reusing a kept checkpoint when ``ckpt_dir`` holds one), evaluate; the run record.

    With ``ckpt_dir`` the checkpoint is kept there for later runs of the same calibration; without, deleted.
    """
    from w4a8_dint.embedded import embedded_model_dir

    record: dict[str, Any] = {"label": spec.label, "key": run_key(spec, study)}
    if spec.method is None:
        t0 = time.perf_counter()
        record["results"] = _evaluate(embedded_model_dir(), spec, study, progress)
        record["eval_s"] = round(time.perf_counter() - t0, 1)
        return record
    kept = ckpt_path(spec, study, ckpt_dir) if ckpt_dir else None
    tmp = Path(tempfile.mkdtemp(prefix="w4a8-accuracy-"))
    try:
        if kept is not None and (kept / "config.json").is_file():
            ckpt = kept
            record["reused_checkpoint"] = True
        else:
            t0 = time.perf_counter()
            _calibrate(spec, study, tmp / "ckpt", progress)
            record["calibrate_s"] = round(time.perf_counter() - t0, 1)
            ckpt = tmp / "ckpt"
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(ckpt, kept)  # atomic; another worker may have won the race, then use its copy
                except OSError:
                    pass
                ckpt = kept if (kept / "config.json").is_file() else ckpt
        record["calibration"] = _calibration_record(ckpt)
        t0 = time.perf_counter()
        record["results"] = _evaluate(ckpt, spec, study, progress)
        record["eval_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # keep results, never stray checkpoints
    return record


def _summary_line(record: dict[str, Any]) -> str:
    parts = []
    for name, r in record["results"].items():
        if isinstance(r, dict) and "ppl" in r:
            parts.append(f"{name} {r['ppl']:.2f}")
        elif isinstance(r, dict) and "acc" in r:
            parts.append(f"{name} {100 * r['acc']:.1f}%")
    times = ", ".join(f"{k} {record[k]}" for k in ("calibrate_s", "eval_s") if k in record)
    return f"{record['label']}: " + ", ".join(parts) + f" ({times})"


def cached_run(spec: RunSpec, study: StudySettings, runs_dir: Path, progress: bool, compute: bool = True,
               ckpt_dir: Path | None = None) -> dict | None:
    path = run_path(spec, study, runs_dir)
    if path.is_file():
        return json.loads(path.read_text())
    if not compute:
        return None
    print(f"[accuracy] run {spec.label}", file=sys.stderr, flush=True)
    record = execute(spec, study, progress, ckpt_dir)
    _check_finite(record)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a killed run never leaves a half-written cache entry
    print(f"[accuracy]   {_summary_line(record)}", file=sys.stderr, flush=True)
    return record


def _check_finite(record: dict[str, Any]) -> None:
    for name, r in record["results"].items():
        if isinstance(r, dict) and "ppl" in r and not math.isfinite(r["ppl"]):
            raise RuntimeError(f"{record['label']}: {name} perplexity is {r['ppl']} (quantization broke the model)")


def ppl(record: dict | None, dataset: str) -> float:
    if record is None or dataset not in record["results"]:
        return float("nan")
    return record["results"][dataset]["ppl"]


def acc(record: dict | None, task: str, metric: str = "acc") -> float:
    if record is None or task not in record["results"]:
        return float("nan")
    return record["results"][task][metric]


# -- worker processes -----------------------------------------------------------------------------

def run_jobs(commands: list[list[str]], jobs: int, env: dict[str, str] | None = None, poll_s: float = 0.2,
             log=None, busy=None) -> list[int]:
    """Run ``commands`` as subprocesses, at most ``jobs`` at once, started in list order.

    ``busy(own_pids)`` counts heavy processes running outside this call (a restarted study's
    orphaned workers); they take slots too. Returns the exit codes in list order (a failed
    command does not stop the others).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    nxt = 0
    while nxt < len(commands) or running:
        outside = busy({p.pid for p in running.values()}) if busy else 0
        while nxt < len(commands) and len(running) + outside < jobs:
            running[nxt] = subprocess.Popen(commands[nxt], env=env)
            nxt += 1
        time.sleep(poll_s)
        for i, proc in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                codes[i] = rc
                del running[i]
                if rc != 0 and log is not None:
                    print(f"[accuracy] job {i} failed (exit {rc}): {' '.join(commands[i])[-300:]}", file=log, flush=True)
    return [int(c) for c in codes]  # type: ignore[arg-type]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # one core per worker: the search's many small ops scale badly across threads
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _spec_from_json(d: dict[str, Any]) -> RunSpec:
    d = dict(d)
    for k in ("scale_families", "fptq_bounds"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return RunSpec(**d)


def _study_from_json(d: dict[str, Any]) -> StudySettings:
    tuple_fields = {f.name for f in fields(StudySettings) if str(f.type).startswith("tuple")}
    return StudySettings(**{k: tuple(v) if k in tuple_fields else v for k, v in d.items()})


def worker_command(spec: RunSpec, study: StudySettings, runs_dir: Path, ckpt_dir: Path | None) -> list[str]:
    job = {"spec": asdict(spec), "study": asdict(study), "runs_dir": str(runs_dir),
           "ckpt_dir": None if ckpt_dir is None else str(ckpt_dir)}
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]


def _lock_path(spec: RunSpec, study: StudySettings, runs_dir: Path) -> Path:
    return run_path(spec, study, runs_dir).with_suffix(".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def in_progress(spec: RunSpec, study: StudySettings, runs_dir: Path) -> bool:
    """A live worker holds this run's lock (so a restarted study does not compute it twice)."""
    lock = _lock_path(spec, study, runs_dir)
    try:
        return _pid_alive(int(lock.read_text().strip() or 0))
    except (FileNotFoundError, ValueError):
        return False


def live_locks(runs_dir: Path, exclude: set[int] = frozenset()) -> int:
    """Workers (not in ``exclude``) that hold a run lock in ``runs_dir`` and are alive."""
    n = 0
    for lock in runs_dir.glob("*.lock"):
        try:
            pid = int(lock.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            continue
        n += pid not in exclude and _pid_alive(pid)
    return n


def _worker(job_json: str) -> int:
    import torch

    torch.set_num_threads(1)
    job = json.loads(job_json)
    spec, study, runs_dir = _spec_from_json(job["spec"]), _study_from_json(job["study"]), Path(job["runs_dir"])
    ckpt_dir = Path(job["ckpt_dir"]) if job["ckpt_dir"] else None
    if run_path(spec, study, runs_dir).is_file() or in_progress(spec, study, runs_dir):
        return 0  # done meanwhile, or another study's worker is on it
    lock = _lock_path(spec, study, runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        cached_run(spec, study, runs_dir, False, True, ckpt_dir)
    finally:
        lock.unlink(missing_ok=True)
    return 0


# -- the study ----------------------------------------------------------------------------------

def parts(quick: bool, study: StudySettings | None = None) -> dict[str, list[RunSpec]]:
    """The planned runs, by part, in priority order (computed top to bottom)."""
    if quick:
        return {"quick": [RunSpec(None), RunSpec("rtn", "int4"), RunSpec("aqas", "int4")]}
    study = study or StudySettings()
    R = RunSpec
    # AQAS dint4-a first: its time sizes the rest of the plan.
    main = [R("aqas", "dint4-a"), R(None)] + [R(m, "dint4-a") for m in ("rtn", "awq", "smoothquant")]
    main += [R(m, f) for f in ("int4", "fp4") for m in MAIN_METHODS]
    g64 = [R(m, f, group_size=64) for f in ("dint4-a", "int4") for m in ("aqas", "awq", "rtn")]
    # FPTQ (group-wise 64: 128 does not divide K=576) and its layer-policy bounds
    g64 += [R("fptq", "dint4-a"), R("fptq", "dint4-a", fptq_bounds=NO_LAE_BOUNDS)]
    g64 += [R(m, "fp4", group_size=64) for m in ("aqas", "awq")]  # fp4 won per channel: does it at g64 too?
    # SLAC: static per-tensor activation scales, the extremes first (they decide the verdict)
    lengths = sorted(study.slac_lengths)
    order = [lengths[0], lengths[-1]] + lengths[1:-1]
    slac = [R(None, eval="slac")] + [R("aqas", "dint4-a", act_mode="per-tensor", calib_len=L, eval="slac") for L in order]
    slac.append(R(None, eval="range"))
    dint = [R(m, f) for m in ("rtn", "aqas") for f in ("dint4-b", "dint4-c")]
    zeroshot = [R(None, eval="zeroshot")] + [R(m, "dint4-a", eval="zeroshot") for m in ("aqas", "awq", "rtn", "smoothquant")]
    zeroshot += [R(m, "fp4", eval="zeroshot") for m in ("aqas", "awq")]  # the best per-channel format, for contrast
    family = [R("aqas", "dint4-a", scale_families=("mean",)), R("aqas", "dint4-a", scale_families=("max",))]
    # RTN with per-token activations reads no calibration data (a seed changes nothing), so the repeat is AWQ.
    noise = [R("aqas", "dint4-a", seed=1), R("awq", "dint4-a", seed=1)]
    # SLAC's verdict compares two static-scale runs; a second seed of each says whether the gap is noise.
    noise += [R("aqas", "dint4-a", act_mode="per-tensor", calib_len=L, seed=1, eval="slac") for L in (lengths[0], lengths[-1])]
    # added after seed 1 moved these runs by up to 17%: a third seed, and a repeat of the best family variant
    noise += [R("aqas", "dint4-a", act_mode="per-tensor", calib_len=L, seed=2, eval="slac") for L in (lengths[0], lengths[-1])]
    noise += [R("aqas", "dint4-a", scale_families=("max",), seed=1)]
    # AQAS's loss sees the INT8 activations, which matters most with static scales: the methods at the SLAC
    # runs' 512-token static setting (aqas comes from the slac part), scored at the same windows.
    static = [R(m, "dint4-a", act_mode="per-tensor", calib_len=STATIC_LEN, eval="slac") for m in ("awq", "smoothquant", "rtn")]
    return {"main": main, "g64": g64, "slac": slac, "dint": dint, "zeroshot": zeroshot, "family": family, "noise": noise,
            "static": static}


def _shared_calibrations(plan: dict[str, list[RunSpec]], study: StudySettings) -> set[str]:
    """Checkpoint names needed by more than one planned run (kept between runs)."""
    count: dict[str, int] = {}
    for specs in plan.values():
        for s in specs:
            if s.method is not None:
                name = ckpt_path(s, study, Path(".")).name
                count[name] = count.get(name, 0) + 1
    return {n for n, c in count.items() if c > 1}


def run_study(quick: bool, only: list[str] | None, runs_dir: Path, progress: bool, compute: bool, jobs: int = 1,
              ckpt_dir: Path = CKPT_DIR) -> dict[str, list]:
    study = QUICK if quick else StudySettings()
    plan = parts(quick, study)
    shared = _shared_calibrations(plan, study)
    todo = [s for part, specs in plan.items() if only is None or part in only for s in specs
            if not run_path(s, study, runs_dir).is_file() and not in_progress(s, study, runs_dir)]
    todo = list(dict.fromkeys(todo))  # a spec in two parts runs once
    keep = lambda s: ckpt_dir if s.method is not None and ckpt_path(s, study, ckpt_dir).name in shared else None  # noqa: E731
    if compute and todo:
        print(f"[accuracy] {len(todo)} runs to compute with {jobs} job(s): " + "; ".join(s.label for s in todo),
              file=sys.stderr, flush=True)
        if jobs == 1:
            for s in todo:
                try:
                    cached_run(s, study, runs_dir, progress, True, keep(s))
                except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
                    print(f"[accuracy] {s.label} failed: {e!r}", file=sys.stderr, flush=True)
        else:
            run_jobs([worker_command(s, study, runs_dir, keep(s)) for s in todo], jobs, _worker_env(), log=sys.stderr,
                     busy=lambda own: live_locks(runs_dir, own))
    out = {part: [(s, cached_run(s, study, runs_dir, progress, False)) for s in specs] for part, specs in plan.items()}
    # Drop kept checkpoints once every run that reads them is cached.
    for s in {s for rows in out.values() for s, _ in rows if s.method is not None}:
        path = ckpt_path(s, study, ckpt_dir)
        if path.exists() and all(r is not None for rows in out.values() for t, r in rows
                                 if t.method is not None and ckpt_path(t, study, ckpt_dir) == path):
            shutil.rmtree(path, ignore_errors=True)
    return out


def prune_stale(runs_dir: Path, quick: bool = False) -> list[Path]:
    """Delete cached run JSONs that no planned run reads (older settings); returns what was deleted."""
    study = QUICK if quick else StudySettings()
    keep = {run_path(s, study, runs_dir).name for specs in parts(quick, study).values() for s in specs}
    stale = [p for p in sorted(runs_dir.glob("*.json")) if p.name not in keep]
    for p in stale:
        p.unlink()
    return stale


# -- verdicts, tables, plots ----------------------------------------------------------------------

def _find(rows: list, method: str | None, fmt: str | None, **kw) -> dict | None:
    kw.setdefault("group_size", None)
    kw.setdefault("scale_families", None)
    kw.setdefault("fptq_bounds", None)
    kw.setdefault("act_mode", "per-token")
    kw.setdefault("calib_len", None)
    kw.setdefault("seed", None)
    kw.setdefault("eval", "ppl")
    for spec, rec in rows:
        if spec.method == method and spec.format == fmt and all(getattr(spec, k) == v for k, v in kw.items()):
            return rec
    return None


def _all_rows(res: dict[str, list]) -> list:
    return [row for rows in res.values() for row in rows]


def _verdict(claim: str, wins: int, total: int, detail: list[str]) -> dict[str, Any]:
    if total == 0:
        v = "not tested (runs missing)"
    elif wins == total:
        v = f"holds here ({wins}/{total})"
    elif wins == 0:
        v = f"does not hold here (0/{total})"
    else:
        v = f"mixed: holds in {wins}/{total}"
    return {"claim": claim, "verdict": v, "detail": detail}


def slac_verdict(res: dict[str, list], study: StudySettings) -> dict[str, Any]:
    """Short eval window: does calibrating at the shortest length beat calibrating at the longest?

    One comparison per dataset; the long-window comparison is reported alongside (not counted).
    """
    rows = _all_rows(res)
    short_L, long_L = min(study.slac_lengths), max(study.slac_lengths)
    short_e, long_e = min(study.slac_eval_lengths), max(study.slac_eval_lengths)
    cs, cl = _slac_seeds(rows, short_L), _slac_seeds(rows, long_L)
    claim = "SLAC helps when the target task is short"
    if not cs or not cl:
        return _verdict(claim, 0, 0, [])
    seeds = f" (geo. mean of {len(cs)} / {len(cl)} seeds)" if len(cs) > 1 or len(cl) > 1 else ""
    wins, total, detail = 0, 0, []
    for d in study.ppl_sets:
        a, b = _mean_ppl(cs, (f"{d}@{short_e}",)), _mean_ppl(cl, (f"{d}@{short_e}",))
        total += 1
        wins += a < b
        detail.append(f"{d.upper()} eval {short_e}: calib {short_L} {a:.2f} vs calib {long_L} {b:.2f}{seeds}")
    for d in study.ppl_sets:
        a, b = _mean_ppl(cs, (f"{d}@{long_e}",)), _mean_ppl(cl, (f"{d}@{long_e}",))
        detail.append(f"(long target) {d.upper()} eval {long_e}: calib {short_L} {a:.2f} vs calib {long_L} {b:.2f}{seeds}")
    return _verdict(claim + f" (static per-tensor activations; eval window {short_e})", wins, total, detail)


def _slac_seeds(rows: list, length: int) -> list[dict]:
    """The SLAC runs at one calibration length, every seed that ran."""
    recs = [_find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=length, eval="slac", seed=s) for s in (None, 1, 2)]
    return [r for r in recs if r is not None]


def verdicts(res: dict[str, list], study: StudySettings | None = None) -> list[dict[str, Any]]:
    study = study or StudySettings()
    main = res.get("main", [])
    out = []
    # dINT beats INT4 and FP4 at W4A8: per method and dataset, dint4-a (default table) vs the other two
    wins, total, detail = 0, 0, []
    for m in MAIN_METHODS:
        for d in study.ppl_sets:
            x = {f: ppl(_find(main, m, f), d) for f in ("dint4-a", "int4", "fp4")}
            if all(math.isfinite(v) for v in x.values()):
                total += 1
                wins += x["dint4-a"] < min(x["int4"], x["fp4"])
                detail.append(f"{m} {d.upper()}: dint4-a {x['dint4-a']:.2f} / int4 {x['int4']:.2f} / fp4 {x['fp4']:.2f}")
    out.append(_verdict("dINT4 beats INT4 and FP4 at W4A8 (per channel, per method and dataset)", wins, total, detail))
    # the two halves separately, per channel and at g64 (where those runs exist)
    rows = _all_rows(res)
    for other in ("int4", "fp4"):
        wins, total, detail = 0, 0, []
        for group, methods in ((None, MAIN_METHODS), (64, G64_METHODS)):
            for m in methods:
                for d in study.ppl_sets:
                    a, b = ppl(_find(rows, m, "dint4-a", group_size=group), d), ppl(_find(rows, m, other, group_size=group), d)
                    if math.isfinite(a) and math.isfinite(b):
                        total += 1
                        wins += a < b
                        detail.append(f"{m} {'g64' if group else 'pc'} {d.upper()}: {a:.2f} vs {b:.2f}")
        out.append(_verdict(f"... dINT4 (dint4-a) beats {other.upper()} alone (per channel and g64)", wins, total, detail))
    # AQAS beats AWQ and SmoothQuant at W4A8
    wins, total, detail = 0, 0, []
    for f in MAIN_FORMATS:
        for d in study.ppl_sets:
            x = {m: ppl(_find(main, m, f), d) for m in ("aqas", "awq", "smoothquant")}
            if all(math.isfinite(v) for v in x.values()):
                total += 1
                wins += x["aqas"] < min(x["awq"], x["smoothquant"])
                detail.append(f"{f} {d.upper()}: aqas {x['aqas']:.2f} / awq {x['awq']:.2f} / smoothquant {x['smoothquant']:.2f}")
    out.append(_verdict("AQAS beats AWQ and SmoothQuant at W4A8 (per channel, per format and dataset)", wins, total, detail))
    wins, total, detail = 0, 0, []
    rows = _all_rows(res)
    st = {m: _find(rows, m, "dint4-a", act_mode="per-tensor", calib_len=STATIC_LEN, eval="slac")
          for m in ("aqas", "awq", "smoothquant")}
    if all(r is not None for r in st.values()):
        for e in study.slac_eval_lengths:
            for d in study.ppl_sets:
                x = {m: ppl(r, f"{d}@{e}") for m, r in st.items()}
                total += 1
                wins += x["aqas"] < min(x["awq"], x["smoothquant"])
                detail.append(f"{d.upper()} eval {e}: aqas {x['aqas']:.2f} / awq {x['awq']:.2f} / smoothquant {x['smoothquant']:.2f}")
    out.append(_verdict("... AQAS beats AWQ and SmoothQuant with static per-tensor activations (dint4-a, per channel)",
                        wins, total, detail))
    out.append(slac_verdict(res, study))
    g = res.get("g64", [])
    lae, no_lae = _find(g, "fptq", "dint4-a"), _find(g, "fptq", "dint4-a", fptq_bounds=NO_LAE_BOUNDS)
    wins, total, detail = 0, 0, []
    if lae is not None and no_lae is not None:
        for d in study.ppl_sets:
            total += 1
            wins += ppl(lae, d) < ppl(no_lae, d)
            detail.append(f"{d.upper()}: LAE+static (bounds 15/150) {ppl(lae, d):.2f} / static without LAE (150/150) "
                          f"{ppl(no_lae, d):.2f}")
    out.append(_verdict("FPTQ's LAE helps the intractable layers (15 <= max abs X < 150)", wins, total, detail))
    return out


def _mean_ppl(recs: list[dict | None], datasets: tuple[str, ...]) -> float:
    """Mean over datasets of log-ppl, back to ppl (a geometric mean: PTB and C4 differ 2x in scale)."""
    vals = [ppl(r, d) for r in recs for d in datasets]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals and all(math.isfinite(v) for v in vals) else float("nan")


def dint_ranking(res: dict[str, list], study: StudySettings | None = None) -> list[tuple[str, float]]:
    """dINT tables ranked by geometric-mean perplexity (PTB and C4) over rtn and aqas (best first)."""
    study = study or StudySettings()
    rows = _all_rows(res)
    mean = {f: _mean_ppl([_find(rows, m, f) for m in ("rtn", "aqas")], study.ppl_sets) for f in DINT_FORMATS}
    if not all(math.isfinite(v) for v in mean.values()):
        return []
    return sorted(mean.items(), key=lambda kv: kv[1])


def defaults_from_data(res: dict[str, list], study: StudySettings | None = None) -> dict[str, Any]:
    """What the numbers say the calibrate defaults should be (geometric mean of PTB and C4 ppl)."""
    study = study or StudySettings()
    main, rows = res.get("main", []), _all_rows(res)
    out: dict[str, Any] = {}
    fmt = {f: _mean_ppl([_find(main, m, f) for m in MAIN_METHODS], study.ppl_sets) for f in MAIN_FORMATS}
    if all(math.isfinite(v) for v in fmt.values()):
        out["format_family"] = sorted(fmt.items(), key=lambda kv: kv[1])
    g64 = {f: _mean_ppl([_find(rows, m, f, group_size=64) for m in ("aqas", "awq")], study.ppl_sets) for f in G64_FORMATS}
    if all(math.isfinite(v) for v in g64.values()):
        out["format_family_g64"] = sorted(g64.items(), key=lambda kv: kv[1])
    meth = {m: _mean_ppl([_find(main, m, f) for f in MAIN_FORMATS], study.ppl_sets) for m in MAIN_METHODS}
    if all(math.isfinite(v) for v in meth.values()):
        out["method"] = sorted(meth.items(), key=lambda kv: kv[1])
    ranking = dint_ranking(res, study)
    if ranking:
        out["dint_table"] = ranking
    fam = {"mean+max": _find(main, "aqas", "dint4-a"), "mean": _find(rows, "aqas", "dint4-a", scale_families=("mean",)),
           "max": _find(rows, "aqas", "dint4-a", scale_families=("max",))}
    if all(r is not None for r in fam.values()):
        out["scale_families"] = sorted(((k, _mean_ppl([r], study.ppl_sets)) for k, r in fam.items()), key=lambda kv: kv[1])
    grp = {"per channel": _find(main, "aqas", "dint4-a"), "g64": _find(rows, "aqas", "dint4-a", group_size=64)}
    if all(r is not None for r in grp.values()):
        out["group_aqas_dint4a"] = sorted(((k, _mean_ppl([r], study.ppl_sets)) for k, r in grp.items()), key=lambda kv: kv[1])
    return out


def seed_spread(res: dict[str, list], study: StudySettings | None = None) -> list[dict[str, Any]]:
    """Relative perplexity change between seed 0 and seed 1 of the same calibration."""
    study = study or StudySettings()
    rows, out = _all_rows(res), []
    for m, fam in (("aqas", None), ("awq", None), ("aqas", ("max",))):
        a, b = _find(rows, m, "dint4-a", scale_families=fam), _find(rows, m, "dint4-a", scale_families=fam, seed=1)
        if a is not None and b is not None:
            for d in study.ppl_sets:
                out.append({"run": f"{m} dint4-a" + (f" fam={'+'.join(fam)}" if fam else ""), "dataset": d,
                            "seed0": ppl(a, d), "seed1": ppl(b, d), "rel": abs(ppl(a, d) - ppl(b, d)) / ppl(a, d)})
    return out


def _cell(rec: dict | None, key: str) -> str:
    v = ppl(rec, key)
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def _acc_cell(rec: dict | None, task: str, metric: str) -> str:
    v = acc(rec, task, metric)
    return "—" if not math.isfinite(v) else f"{100 * v:.1f}"


def mean_layer_error(rec: dict | None) -> float:
    errs = [] if rec is None else [e for e in rec.get("calibration", {}).get("layer_rel_error", {}).values() if e is not None]
    return sum(errs) / len(errs) if errs else float("nan")


def _err_cell(rec: dict | None) -> str:
    v = mean_layer_error(rec)
    return "—" if not math.isfinite(v) else f"{v:.4f}"


def runtime_rows(res: dict[str, list]) -> list[tuple[str, int, tuple | None, tuple | None]]:
    """(run type, count, (min, max) calibrate s, (min, max) eval s) over the cached runs (load varies a lot)."""
    groups: dict[str, list[dict]] = {}
    for spec, rec in _all_rows(res):
        if rec is None:
            continue
        if spec.method is None:
            kind = f"fp32 [{spec.eval}]"
        else:
            g = "g64" if spec.group_size == 64 or spec.method == "fptq" else "pc"
            kind = f"{spec.method} {g}" + (f" L={spec.calib_len} static" if spec.calib_len else "") + \
                   ("" if spec.eval == "ppl" else f" [{spec.eval}]")
        groups.setdefault(kind, []).append(rec)
    out = []
    for kind, recs in groups.items():
        cs = [r["calibrate_s"] for r in recs if r.get("calibrate_s") is not None]
        es = [r["eval_s"] for r in recs if r.get("eval_s") is not None]
        out.append((kind, len(recs), (min(cs), max(cs)) if cs else None, (min(es), max(es)) if es else None))
    return out


def markdown(res: dict[str, list], study: StudySettings) -> str:
    main, rows = res.get("main", []), _all_rows(res)
    fp = _find(main, None, None)
    L = ["# Accuracy study (generated by `python benchmarks/accuracy.py`; do not edit by hand)", ""]
    L += [f"Model: embedded SmolLM2-135M-Instruct (fp32 from its Q4_1 GGUF), **{study.layers_text}**. "
          f"Calibration budget (CPU): {study.samples} x {study.seq_len} tokens of C4 (held-out half), search on "
          f"{study.search_tokens} tokens, alpha grid {list(study.alpha_grid)}, clip grid {list(study.clip_grid)}, seed "
          f"{study.seed} (recipe defaults: 32 samples, 1024 search tokens, 0.05-step alphas, clips 1.0..0.7). "
          f"Perplexity: first {study.ppl_tokens} tokens of PTB test and of the C4 sample, seq 512, non-overlapping "
          f"windows. W4A8 = 4-bit weights (per channel unless noted) x INT8 per-token dynamic activations (unless "
          f"noted), evaluated through the HF quantizer (the bit-exact CPU int8 path). Lower perplexity is better.", ""]
    L += [f"FP32 baseline: PTB {_cell(fp, 'ptb')}, C4 {_cell(fp, 'c4')}.", ""]
    spread = seed_spread(res, study)
    if spread:
        worst = max(s["rel"] for s in spread)
        L += ["**Noise.** Measured seed spread (calibration seed 0 vs 1, same settings): " + "; ".join(
            f"{s['run']} {s['dataset'].upper()} {s['seed0']:.2f} vs {s['seed1']:.2f} ({100 * s['rel']:.1f}%)" for s in spread)
            + f". Per-token runs: treat differences below about {100 * worst:.1f}% as ties (two seeds only, so "
            "this is a floor on the noise, not a confidence interval).", ""]
    else:
        L += ["**Noise.** Seed repeats did not run, so no noise level was measured. Treat differences of a "
              "few percent as ties.", ""]
    slac_spread = []
    for Lc in sorted(study.slac_lengths):
        recs = _slac_seeds(rows, Lc)
        if len(recs) > 1:
            for c in (f"{d}@{e}" for e in study.slac_eval_lengths for d in study.ppl_sets):
                v = [ppl(r, c) for r in recs]
                slac_spread.append((Lc, c, min(v), max(v)))
    if slac_spread:
        worst = max(hi / lo - 1 for _, _, lo, hi in slac_spread)
        L += [f"Static per-tensor activations are far noisier: over {len(_slac_seeds(rows, slac_spread[0][0]))} seeds the "
              f"SLAC runs' perplexity moves by up to {100 * worst:.0f}% (max/min - 1; "
              + "; ".join(f"L={Lc} {c.upper()} {lo:.1f}-{hi:.1f}" for Lc, c, lo, hi in slac_spread) + ").", ""]
    for d in study.ppl_sets:
        L += [f"## Main table: {d.upper()} perplexity, methods x formats (per channel, per-token activations)", "",
              "| method | " + " | ".join(MAIN_FORMATS) + " |", "|---|" + "---:|" * len(MAIN_FORMATS)]
        for m in MAIN_METHODS:
            L.append(f"| {m} | " + " | ".join(_cell(_find(main, m, f), d) for f in MAIN_FORMATS) + " |")
        L.append("| *geo. mean over methods* | " + " | ".join(
            (lambda v: "—" if not math.isfinite(v) else f"{v:.2f}")(_mean_ppl([_find(main, m, f) for m in MAIN_METHODS], (d,)))
            for f in MAIN_FORMATS) + " |")
        L.append("")
    L += ["Mean per-layer relative output error over the 30 layers (from each calibration's record, measured on "
          "its search batch, relative to the layer's float residual update; the quantity the searches fit):", "",
          "| method | " + " | ".join(MAIN_FORMATS) + " |", "|---|" + "---:|" * len(MAIN_FORMATS)]
    for m in MAIN_METHODS:
        L.append(f"| {m} | " + " | ".join(_err_cell(_find(main, m, f)) for f in MAIN_FORMATS) + " |")
    L.append("")
    g = res.get("g64", [])
    L += ["## Group-wise g64 (128 does not divide K=576), per-token activations unless FPTQ", "",
          "| run | PTB | C4 |", "|---|---:|---:|"]
    for spec, rec in g:
        L.append(f"| {spec.label} | {_cell(rec, 'ptb')} | {_cell(rec, 'c4')} |")
    L += ["", "FPTQ picks an activation policy per layer from max|X| (bounds v0/v1): static per-tensor below v0, "
          "LAE + static between, per-token above. `v=150-150` removes the LAE band (static without LAE up to 150).", ""]
    sl = res.get("slac", [])
    ev = study.slac_eval_lengths
    cols = [f"{d}@{e}" for e in ev for d in study.ppl_sets]
    L += ["## SLAC: calibration length vs target length (AQAS dint4-a per channel, **static per-tensor** activations)", "",
          f"Each calibration length sees {study.slac_tokens} C4 tokens (samples = {study.slac_tokens} / length); the search "
          f"batch is the first ceil({study.search_tokens} / length) windows. Each model is scored on the first "
          f"{study.slac_eval_tokens} tokens of PTB and C4 with windows of {' and '.join(map(str, ev))} tokens.", "",
          "| calibration length | " + " | ".join(c.upper().replace("@", " eval ") for c in cols) + " |",
          "|---|" + "---:|" * len(cols)]
    fps = _find(sl, None, None, eval="slac")
    L.append("| fp32 | " + " | ".join(_cell(fps, c) for c in cols) + " |")
    for Lc in sorted(study.slac_lengths):
        r = _find(sl, "aqas", "dint4-a", act_mode="per-tensor", calib_len=Lc, eval="slac")
        L.append(f"| {Lc} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    for Lc in sorted(study.slac_lengths):
        for seed in (1, 2):
            r = _find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=Lc, eval="slac", seed=seed)
            if r is not None:
                L.append(f"| {Lc} (seed {seed}) | " + " | ".join(_cell(r, c) for c in cols) + " |")
    stat = [(m, _find(rows, m, "dint4-a", act_mode="per-tensor", calib_len=STATIC_LEN, eval="slac"))
            for m in ("rtn", "smoothquant", "awq", "aqas")]
    if any(r is not None for _, r in stat):
        L += ["", f"Methods with static per-tensor activations (dint4-a per channel, calibrated on "
              f"{study.slac_tokens // STATIC_LEN} x {STATIC_LEN} tokens, same windows as above):", "",
              "| method | " + " | ".join(c.upper().replace("@", " eval ") for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for m, r in stat:
            L.append(f"| {m} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    rng = _find(sl, None, None, eval="range")
    if rng is not None:
        curve = rng["results"]["range_vs_length"]
        names = list(curve[0]["ranges"])
        L += ["", f"Activation range vs window length (float model, max |X| over all {TOTAL_LAYERS} layers at each linear "
              f"input, {study.range_tokens} C4 tokens per length):", "",
              "| length | " + " | ".join(names) + " | max |", "|---:|" + "---:|" * (len(names) + 1)]
        for row in curve:
            L.append(f"| {row['length']} | " + " | ".join(f"{row['ranges'][n]:.1f}" for n in names) + f" | {row['max']:.1f} |")
    L += ["", "## dINT value-table ablation (per channel, per-token activations)", "",
          "| method | " + " | ".join(f"{f} PTB / C4" for f in DINT_FORMATS) + " |", "|---|" + "---:|" * len(DINT_FORMATS)]
    for m in ("rtn", "aqas"):
        L.append(f"| {m} | " + " | ".join(f"{_cell(r, 'ptb')} / {_cell(r, 'c4')}" for r in
                                          (_find(rows, m, f) for f in DINT_FORMATS)) + " |")
    ranking = dint_ranking(res, study)
    if ranking:
        L += ["", "Geometric mean of PTB and C4 perplexity over rtn and aqas: " + ", ".join(f"{f} {v:.2f}" for f, v in ranking)
              + f". **Best table here: {ranking[0][0]}.**"]
    z = res.get("zeroshot", [])
    L += ["", f"## Zero-shot accuracy (%; first {study.zs_limit} docs per task, per channel)", "",
          f"With {study.zs_limit} docs one standard error is about {100 * math.sqrt(0.25 / study.zs_limit):.0f} points "
          "at 50% accuracy, so only large gaps mean anything.", "",
          "| model | " + " | ".join(f"{t} acc / acc_norm" for t in study.zs_tasks) + " | mean acc |",
          "|---|" + "---:|" * (len(study.zs_tasks) + 1)]
    for spec, rec in z:
        name = "fp32" if spec.method is None else f"{spec.method} {spec.format}"
        accs = [acc(rec, t) for t in study.zs_tasks]
        mean = "—" if not all(math.isfinite(a) for a in accs) else f"{100 * sum(accs) / len(accs):.1f}"
        L.append(f"| {name} | " + " | ".join(f"{_acc_cell(rec, t, 'acc')} / {_acc_cell(rec, t, 'acc_norm')}"
                                              for t in study.zs_tasks) + f" | {mean} |")
    L += ["", "## AQAS scale-family ablation (dint4-a per channel)", "", "| families | PTB | C4 |", "|---|---:|---:|"]
    for name, rec in (("mean+max (default)", _find(main, "aqas", "dint4-a")),
                      ("mean", _find(rows, "aqas", "dint4-a", scale_families=("mean",))),
                      ("max", _find(rows, "aqas", "dint4-a", scale_families=("max",))),
                      ("max (seed 1)", _find(rows, "aqas", "dint4-a", scale_families=("max",), seed=1))):
        L.append(f"| {name} | {_cell(rec, 'ptb')} | {_cell(rec, 'c4')} |")
    L += ["", "## Claims (verdicts computed from the numbers above)", "", "| claim | verdict | numbers |", "|---|---|---|"]
    for v in verdicts(res, study):
        L.append(f"| {v['claim']} | {v['verdict']} | {'; '.join(v['detail']) or '—'} |")
    dd = defaults_from_data(res, study)
    L += ["", "## What the data say about the calibrate defaults", "",
          "Ranked by the geometric mean of PTB and C4 perplexity (lower is better):", ""]
    names = {"format_family": "4-bit format, per channel (mean over the 4 methods)",
             "format_family_g64": "4-bit format, g64 (mean over aqas, awq)", "method": "method (mean over the 3 formats)",
             "dint_table": "dINT table (mean over rtn, aqas)", "scale_families": "AQAS scale families (dint4-a)",
             "group_aqas_dint4a": "AQAS dint4-a weight groups"}
    for k, label in names.items():
        if k in dd:
            L.append(f"- {label}: " + ", ".join(f"{n} {v:.2f}" for n, v in dd[k]))
    if not dd:
        L.append("- (runs missing)")
    L += ["", "## Measured runtime (shared 2-core CPU, one torch thread per run, 2 runs in parallel)", "",
          "Wall seconds per run, min-max over the runs of each type. The box was shared: other engineers' vLLM "
          "tests and calibrations ran at the same time, so the same run type varied up to 2-3x.", "",
          "| run type | runs | calibrate s | eval s |", "|---|---:|---:|---:|"]
    span = lambda t: "—" if t is None else (f"{t[0]:.0f}" if round(t[0]) == round(t[1]) else f"{t[0]:.0f}-{t[1]:.0f}")  # noqa: E731
    for kind, n, c, e in runtime_rows(res):
        L.append(f"| {kind} | {n} | {span(c)} | {span(e)} |")
    missing = [f"{part}: {s.label}" for part, rs in res.items() for s, r in rs if r is None]
    L += ["", "## Not run / cut", ""]
    L += [f"- {m}" for m in missing] or ["- nothing missing from the planned grid"]
    L += ["- the recipe's full calibration budget (32 samples, 1024 search tokens, full alpha/clip grids): "
          "cut for CPU time (budget above)", ""]
    L += ["Plots: `results/accuracy_main.png`, `results/accuracy_g64.png`, `results/accuracy_dint.png`, "
          "`results/accuracy_slac.png`, `results/accuracy_range_vs_length.png`. Per-run JSON (settings, timings, "
          "searched alphas/families, per-layer relative error): `results/accuracy_runs/`.", ""]
    return "\n".join(L)


def _bars(ax, groups: list[str], series: dict[str, list[float]], base: float) -> None:
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(groups))], [v - base for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.legend(fontsize=8)


def plots(res: dict[str, list], study: StudySettings, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    main, rows = res.get("main", []), _all_rows(res)
    fp = _find(main, None, None)

    def save(fig, name):
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    def base(d):  # plot the loss vs float: absolute bars hide the gaps
        v = ppl(fp, d)
        return v if math.isfinite(v) else 0.0

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    for ax, d in zip(axes[0], study.ppl_sets):
        _bars(ax, list(MAIN_METHODS), {f: [ppl(_find(main, m, f), d) for m in MAIN_METHODS] for f in MAIN_FORMATS}, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_title(f"W4A8 per channel, {study.layers_text.split(' quantized')[0]}")
    save(fig, "accuracy_main.png")

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    g = res.get("g64", [])
    for ax, d in zip(axes[0], study.ppl_sets):
        fptq = [ppl(_find(g, "fptq", "dint4-a"), d), ppl(_find(g, "fptq", "dint4-a", fptq_bounds=NO_LAE_BOUNDS), d)]
        series = {f: [ppl(_find(g, m, f, group_size=64), d) for m in G64_METHODS] for f in G64_FORMATS}
        for f in G64_FORMATS:
            if f != "dint4-a":
                series[f] += [float("nan")] * 2  # FPTQ ran on dint4-a only
        series["dint4-a"] += fptq
        _bars(ax, list(G64_METHODS) + ["fptq\n(LAE)", "fptq\n(no LAE)"], series, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_title("W4A8 group-wise g64")
    save(fig, "accuracy_g64.png")

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    for ax, d in zip(axes[0], study.ppl_sets):
        _bars(ax, ["rtn", "aqas"], {f: [ppl(_find(rows, m, f), d) for m in ("rtn", "aqas")] for f in DINT_FORMATS}, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_yscale("log")  # dint4-b with RTN is ~100x worse than the others
        ax.set_title("dINT4 value tables (per channel)")
    save(fig, "accuracy_dint.png")

    sl = res.get("slac", [])
    fps = _find(sl, None, None, eval="slac")
    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    lengths = sorted(study.slac_lengths)
    for ax, d in zip(axes[0], study.ppl_sets):
        for e in study.slac_eval_lengths:
            key = f"{d}@{e}"
            f0 = ppl(fps, key)
            vals = [ppl(_find(sl, "aqas", "dint4-a", act_mode="per-tensor", calib_len=c, eval="slac"), key) for c in lengths]
            # relative to the float model at the same window: the two eval lengths have different ppl scales
            line, = ax.plot(lengths, [v / f0 if math.isfinite(f0) else v for v in vals], "o-", label=f"eval window {e}")
            rep = [(c, ppl(_find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=c, eval="slac", seed=sd), key))
                   for c in lengths for sd in (1, 2)]
            rep = [(c, v / f0 if math.isfinite(f0) else v) for c, v in rep if math.isfinite(v)]
            if rep:  # the seed repeats: how far one calibration length moves by chance
                ax.plot(*zip(*rep), "x", color=line.get_color(), markersize=9, label=f"eval window {e}, other seeds")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration window length (tokens)")
        ax.set_ylabel(f"{d.upper()} ppl / fp32 ppl at the same window")
        ax.set_title("SLAC: AQAS dint4-a, static per-tensor acts")
        ax.legend(fontsize=8)
    save(fig, "accuracy_slac.png")

    rng = _find(sl, None, None, eval="range")
    if rng is not None:
        curve = rng["results"]["range_vs_length"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in curve[0]["ranges"]:
            ax.plot([r["length"] for r in curve], [r["ranges"][n] for r in curve], "o-", label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("window length (tokens), same token budget per length")
        ax.set_ylabel(f"max |X| over all {TOTAL_LAYERS} layers")
        ax.set_title("Activation range vs sequence length (float model, C4)")
        ax.legend(fontsize=8)
        save(fig, "accuracy_range_vs_length.png")
    return written


def summary_json(res: dict[str, list], study: StudySettings, quick: bool) -> dict[str, Any]:
    def results(r):
        if r is None:
            return None
        return {k: (v["ppl"] if "ppl" in v else {m: v[m] for m in ("acc", "acc_norm", "n") if m in v})
                for k, v in r["results"].items() if isinstance(v, dict)} if "range_vs_length" not in r["results"] \
            else {"range_vs_length": r["results"]["range_vs_length"]}

    return {
        "study": asdict(study), "quick": quick,
        "runs": {part: [{"label": s.label, "spec": run_key(s, study)["spec"],
                         "ppl": None if r is None else {d: ppl(r, d) for d in study.ppl_sets if d in r["results"]},
                         "results": results(r),
                         "calibrate_s": None if r is None else r.get("calibrate_s"),
                         "eval_s": None if r is None else r.get("eval_s"),
                         "layer_rel_error": None if r is None else r.get("calibration", {}).get("layer_rel_error")}
                        for s, r in rows] for part, rows in res.items()},
        "verdicts": [] if quick else verdicts(res, study),
        "dint_ranking": [] if quick else dint_ranking(res, study),
        "defaults_from_data": {} if quick else defaults_from_data(res, study),
        "seed_spread": [] if quick else seed_spread(res, study),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-size run (rtn vs aqas, int4, 1 layer)")
    p.add_argument("--only", default=None, help="comma-separated parts to compute: main,g64,slac,dint,zeroshot,family,noise,static")
    p.add_argument("--report-only", action="store_true", help="compute nothing; rebuild the report from the cache")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for missing runs (each: one torch thread)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where JSON/PNG go (runs in <dir>/accuracy_runs)")
    p.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR, help="checkpoints shared by several runs wait here")
    p.add_argument("--prune", action="store_true", help="delete cached runs that the current plan does not read")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, as JSON
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")

    study = QUICK if args.quick else StudySettings()
    only = args.only.split(",") if args.only else None
    known = set(parts(args.quick, study))
    if only and not set(only) <= known:
        p.error(f"unknown part(s) {sorted(set(only) - known)}; known: {sorted(known)}")
    if not args.report_only and args.jobs == 1:
        import torch

        torch.manual_seed(0)
    runs_dir = args.results_dir / "accuracy_runs"
    if args.prune:
        for stale in prune_stale(runs_dir, args.quick):
            print(f"[accuracy] pruned stale {stale.name}", file=sys.stderr)
    res = run_study(args.quick, only, runs_dir, not args.no_progress, not args.report_only, args.jobs, args.ckpt_dir)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "accuracy_quick.json" if args.quick else "accuracy.json"
    (args.results_dir / name).write_text(json.dumps(summary_json(res, study, args.quick), indent=1))
    for part, rows in res.items():
        for s, r in rows:
            print(f"{part:8s} {s.label:48s} " + ("—" if r is None else _summary_line(r).split(": ", 1)[1]))
    if not args.quick:
        text = markdown(res, study)
        (REPORT_MD if args.results_dir == RESULTS_DIR else args.results_dir / "accuracy.md").write_text(text)
        plots(res, study, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
