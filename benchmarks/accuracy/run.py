"""Executing the accuracy study's runs: calibrate (in a child process, measured), evaluate, cache.

One run = calibrate -> evaluate -> a JSON under ``<results>/accuracy_runs/`` (``plan.run_path``); a
cached key is never recomputed. Calibration runs in a fresh child process so its wall time, CPU time
(user + system, all threads) and peak RSS are that calibration's alone, whatever ran before it in the
parent. ``--jobs N`` runs missing runs in N worker processes (one torch thread each).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .plan import (CKPT_DIR, QUICK, SCRIPT, TOTAL_LAYERS, RunSpec, StudySettings, calib_settings, ckpt_path,
                   eval_settings, parts, run_key, run_path, shared_calibrations, spec_from_json, study_from_json)

# -- one run ------------------------------------------------------------------------------------

def _calibration_record(ckpt: Path) -> dict[str, Any]:
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cal = q.get("calibration", {})
    layers = cal.get("layers", {})
    return {
        "group_size": q.get("group_size"), "rounding": q.get("rounding"), "scale_scheme": q.get("scale_scheme"),
        "rotation": q.get("rotation"),
        "seq_len": cal.get("seq_len"), "samples": cal.get("samples"), "search_tokens_used": cal.get("search_tokens_used"),
        "layer_rel_error": {k: v.get("layer_rel_error") for k, v in layers.items()},
        "choices": {k: [{g: grp.get(g) for g in ("family", "alpha", "act_mode", "fptq") if g in grp}
                        for grp in v.get("groups", [])] for k, v in layers.items()},
        "notes": cal.get("notes", []),
    }


def calibration_job(spec: RunSpec, study: StudySettings, out: Path, progress: bool) -> dict[str, Any]:
    """What the calibration child runs: the CalibrationConfig fields, the rotation and the output dir."""
    c = calib_settings(spec, study)
    optional = {k: list(v) for k, v in (("scale_families", spec.scale_families), ("fptq_bounds", spec.fptq_bounds)) if v}
    config = dict(method=spec.method, format=spec.format, group_size=spec.group_size, act_mode=spec.act_mode,
                  rounding=spec.rounding, scale_scheme=spec.scale_scheme, samples=c["samples"], seq_len=c["seq_len"],
                  search_tokens=c["search_tokens"], alpha_grid=c["alpha_grid"], clip_grid=c["clip_grid"],
                  max_layers=c["max_layers"], seed=c["seed"], device="cpu", progress=progress, **optional)
    return {"config": config, "rotate": spec.rotate, "out": str(out)}


def calibrate_child(job_json: str) -> int:
    """The calibration child's body (``accuracy.py --calibrate JOB``)."""
    from w4a8_dint.calibrate.api import calibrate
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    job = json.loads(job_json)
    calibrate(None, Path(job["out"]), CalibrationConfig(**job["config"]), rotate=job["rotate"])
    _usage_path(Path(job["out"])).write_text(json.dumps({"peak_rss_mib": _own_peak_rss_mib()}))
    return 0


def _usage_path(out: Path) -> Path:
    return out.with_name(out.name + ".usage.json")


def _own_peak_rss_mib() -> float | None:
    """This process's own RSS high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries the spawning parent's
    high-water mark into a vfork+exec child's ``ru_maxrss``, so a child of a big parent reads as big as it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None


def _calibrate(spec: RunSpec, study: StudySettings, out: Path, progress: bool) -> dict[str, Any]:
    """Calibrate in a child process; its wall s, CPU s (user + system, from wait4) and its own peak RSS (MiB, imports
    and model load included)."""
    cmd = [sys.executable, str(SCRIPT), "--calibrate", json.dumps(calibration_job(spec, study, out, progress))]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; keep Popen from waiting again
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.label}: calibration exited with {proc.returncode}")
    own = json.loads(_usage_path(out).read_text()) if _usage_path(out).is_file() else {}
    return {"calibrate_s": round(wall, 1), "calibrate_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "calibrate_peak_rss_mib": own.get("peak_rss_mib"),
            "calibrate_loadavg": [round(x, 2) for x in os.getloadavg()]}  # the 1/5/15-min load when it ended


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


def _cost_path(ckpt: Path) -> Path:
    """The measured calibration cost of a kept checkpoint, next to it (a reused checkpoint reports it too)."""
    return ckpt.with_name(ckpt.name + ".cost.json")


def execute(spec: RunSpec, study: StudySettings, progress: bool, ckpt_dir: Path | None = None,
            rescue_dir: Path = CKPT_DIR) -> dict[str, Any]:
    """Calibrate (unless FP; reusing a kept checkpoint when ``ckpt_dir`` holds one), evaluate; the run record.

    With ``ckpt_dir`` the checkpoint is kept there for later runs of the same calibration; without, deleted.
    When the evaluation fails the checkpoint moves to ``rescue_dir`` instead, so a rerun only re-evaluates
    (a full-model calibration costs minutes on a shared CPU; the evaluation can fail for unrelated reasons).
    """
    from w4a8_dint.embedded import embedded_model_dir

    record: dict[str, Any] = {"label": spec.label, "key": run_key(spec, study)}
    if spec.method is None:
        t0 = time.perf_counter()
        record["results"] = _evaluate(embedded_model_dir(), spec, study, progress)
        record["eval_s"] = round(time.perf_counter() - t0, 1)
        return record
    kept = ckpt_path(spec, study, ckpt_dir) if ckpt_dir else None
    rescued = ckpt_path(spec, study, rescue_dir)
    tmp = Path(tempfile.mkdtemp(prefix="w4a8-accuracy-"))
    try:
        reuse = next((p for p in (kept, rescued) if p is not None and (p / "config.json").is_file()), None)
        if reuse is not None:
            ckpt = reuse
            record["reused_checkpoint"] = True
            if _cost_path(reuse).is_file():
                record.update(json.loads(_cost_path(reuse).read_text()))
        else:
            cost = _calibrate(spec, study, tmp / "ckpt", progress)
            record.update(cost)
            ckpt = tmp / "ckpt"
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(ckpt, kept)  # atomic; another worker may have won the race, then use its copy
                    _cost_path(kept).write_text(json.dumps(cost))
                except OSError:
                    pass
                ckpt = kept if (kept / "config.json").is_file() else ckpt
        record["calibration"] = _calibration_record(ckpt)
        t0 = time.perf_counter()
        try:
            record["results"] = _evaluate(ckpt, spec, study, progress)
        except Exception:
            if ckpt == tmp / "ckpt":  # keep the calibration for the rerun
                rescued.parent.mkdir(parents=True, exist_ok=True)
                os.rename(ckpt, rescued)
                _cost_path(rescued).write_text(json.dumps({k: v for k, v in record.items() if k.startswith("calibrate_")}))
                print(f"[accuracy] {spec.label}: evaluation failed, checkpoint kept at {rescued}", file=sys.stderr, flush=True)
            raise
        record["eval_s"] = round(time.perf_counter() - t0, 1)
        if ckpt == rescued:
            shutil.rmtree(rescued, ignore_errors=True)
            _cost_path(rescued).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # keep results, never stray checkpoints
    return record


def summary_line(record: dict[str, Any]) -> str:
    parts = []
    for name, r in record["results"].items():
        if isinstance(r, dict) and "ppl" in r:
            parts.append(f"{name} {r['ppl']:.2f}")
        elif isinstance(r, dict) and "acc" in r:
            parts.append(f"{name} {100 * r['acc']:.1f}%")
    times = ", ".join(f"{k} {record[k]}" for k in ("calibrate_s", "eval_s") if k in record)
    return f"{record['label']}: " + ", ".join(parts) + f" ({times})"


def cached_run(spec: RunSpec, study: StudySettings, runs_dir: Path, progress: bool, compute: bool = True,
               ckpt_dir: Path | None = None, rescue_dir: Path = CKPT_DIR) -> dict | None:
    path = run_path(spec, study, runs_dir)
    if path.is_file():
        return json.loads(path.read_text())
    if not compute:
        return None
    print(f"[accuracy] run {spec.label}", file=sys.stderr, flush=True)
    record = execute(spec, study, progress, ckpt_dir, rescue_dir)
    _check_finite(record)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a killed run never leaves a half-written cache entry
    print(f"[accuracy]   {summary_line(record)}", file=sys.stderr, flush=True)
    return record


def _check_finite(record: dict[str, Any]) -> None:
    for name, r in record["results"].items():
        if isinstance(r, dict) and "ppl" in r and not math.isfinite(r["ppl"]):
            raise RuntimeError(f"{record['label']}: {name} perplexity is {r['ppl']} (quantization broke the model)")



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


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # one core per worker: the search's many small ops scale badly across threads
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env



def worker_command(spec: RunSpec, study: StudySettings, runs_dir: Path, ckpt_dir: Path | None,
                   rescue_dir: Path = CKPT_DIR) -> list[str]:
    job = {"spec": asdict(spec), "study": asdict(study), "runs_dir": str(runs_dir),
           "ckpt_dir": None if ckpt_dir is None else str(ckpt_dir), "rescue_dir": str(rescue_dir)}
    return [sys.executable, str(SCRIPT), "--worker", json.dumps(job)]


def lock_path(spec: RunSpec, study: StudySettings, runs_dir: Path) -> Path:
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
    lock = lock_path(spec, study, runs_dir)
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


def worker(job_json: str) -> int:
    import torch

    torch.set_num_threads(1)
    job = json.loads(job_json)
    spec, study, runs_dir = spec_from_json(job["spec"]), study_from_json(job["study"]), Path(job["runs_dir"])
    ckpt_dir = Path(job["ckpt_dir"]) if job["ckpt_dir"] else None
    if run_path(spec, study, runs_dir).is_file() or in_progress(spec, study, runs_dir):
        return 0  # done meanwhile, or another study's worker is on it
    lock = lock_path(spec, study, runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        cached_run(spec, study, runs_dir, False, True, ckpt_dir, Path(job.get("rescue_dir") or CKPT_DIR))
    finally:
        lock.unlink(missing_ok=True)
    return 0


# -- the study ----------------------------------------------------------------------------------

def run_study(quick: bool, only: list[str] | None, runs_dir: Path, progress: bool, compute: bool, jobs: int = 1,
              ckpt_dir: Path = CKPT_DIR, labels: list[str] | None = None) -> dict[str, list]:
    """Compute the missing planned runs (of the parts in ``only``, or just the runs named in ``labels``, in
    that order), then return every planned run as ``{part: [(spec, record or None)]}``."""
    study = QUICK if quick else StudySettings()
    plan = parts(quick, study)
    shared = shared_calibrations(plan, study)
    todo = [s for part, specs in plan.items() if only is None or part in only for s in specs
            if not run_path(s, study, runs_dir).is_file() and not in_progress(s, study, runs_dir)]
    todo = list(dict.fromkeys(todo))  # a spec in two parts runs once
    if labels is not None:
        by_label = {s.label: s for s in todo}
        todo = [by_label[name] for name in labels if name in by_label]
    keep = lambda s: ckpt_dir if s.method is not None and ckpt_path(s, study, ckpt_dir).name in shared else None  # noqa: E731
    if compute and todo:
        print(f"[accuracy] {len(todo)} runs to compute with {jobs} job(s): " + "; ".join(s.label for s in todo),
              file=sys.stderr, flush=True)
        if jobs == 1:
            for s in todo:
                try:
                    cached_run(s, study, runs_dir, progress, True, keep(s), ckpt_dir)
                except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
                    print(f"[accuracy] {s.label} failed: {e!r}", file=sys.stderr, flush=True)
        else:
            run_jobs([worker_command(s, study, runs_dir, keep(s), ckpt_dir) for s in todo], jobs, worker_env(), log=sys.stderr,
                     busy=lambda own: live_locks(runs_dir, own))
    out = {part: [(s, cached_run(s, study, runs_dir, progress, False)) for s in specs] for part, specs in plan.items()}
    # Drop kept checkpoints once every run that reads them is cached.
    for s in {s for rows in out.values() for s, _ in rows if s.method is not None}:
        path = ckpt_path(s, study, ckpt_dir)
        if path.exists() and all(r is not None for rows in out.values() for t, r in rows
                                 if t.method is not None and ckpt_path(t, study, ckpt_dir) == path):
            shutil.rmtree(path, ignore_errors=True)
            _cost_path(path).unlink(missing_ok=True)
    return out

