"""Unit tests of the accuracy study's logic (no model): job scheduling, cache keys, verdicts, report text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest



accuracy = sys.modules["accuracy_bench"]  # loaded once by conftest.py

S, R = accuracy.plan.StudySettings, accuracy.plan.RunSpec


def _rec(results: dict, **extra) -> dict:
    return {"label": "x", "results": {k: ({"ppl": v} if not isinstance(v, dict) else v) for k, v in results.items()}, **extra}


# -- job scheduling ---------------------------------------------------------------------------------

def _job(log: Path, i: int, sleep: float, rc: int = 0) -> list[str]:
    code = (f"import time, sys; open({str(log)!r}, 'a').write('start {i} %f\\n' % time.time()); time.sleep({sleep}); "
            f"open({str(log)!r}, 'a').write('end {i} %f\\n' % time.time()); sys.exit({rc})")
    return [sys.executable, "-c", code]


def test_run_jobs_caps_concurrency_starts_in_order_and_keeps_failures(tmp_path, monkeypatch):
    log = tmp_path / "log"
    sleeps = [0.6, 0.1, 0.1, 0.4, 0.1]
    cmds = [_job(log, i, s, rc=3 if i == 2 else 0) for i, s in enumerate(sleeps)]
    launched, real_popen = [], subprocess.Popen

    def popen(cmd, **kw):  # the real process, and the order it was launched in
        launched.append(cmds.index(cmd))
        return real_popen(cmd, **kw)

    monkeypatch.setattr(accuracy.run.subprocess, "Popen", popen)
    codes = accuracy.run.run_jobs(cmds, 2, poll_s=0.02)
    assert codes == [0, 0, 3, 0, 0]  # in list order, a failure does not stop the rest
    assert launched == [0, 1, 2, 3, 4]  # started in priority order
    events = [(line.split()[0], int(line.split()[1]), float(line.split()[2])) for line in log.read_text().splitlines()]
    assert len(events) == 10  # every job ran to its end
    running, peak = 0, 0
    for kind, _, _ in sorted(events, key=lambda e: (e[2], e[0] == "start")):  # an end before a start at a tie
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2


def test_run_jobs_rejects_zero_jobs():
    with pytest.raises(ValueError):
        accuracy.run.run_jobs([], 0)


def test_worker_env_pins_one_thread():
    env = accuracy.run.worker_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"


def test_worker_command_round_trips_spec_and_study(tmp_path):
    spec = R("aqas", "dint4-a", scale_families=("max",), act_mode="per-tensor", calib_len=64, eval="slac")
    study = S(slac_lengths=(64, 128), zs_limit=7)
    cmd = accuracy.run.worker_command(spec, study, tmp_path, None)
    job = json.loads(cmd[-1])
    assert accuracy.plan.spec_from_json(job["spec"]) == spec
    assert accuracy.plan.study_from_json(job["study"]) == study
    # so a worker writes to exactly the cache file the parent reads
    assert accuracy.plan.run_path(accuracy.plan.spec_from_json(job["spec"]), accuracy.plan.study_from_json(job["study"]), tmp_path) \
        == accuracy.plan.run_path(spec, study, tmp_path)


def test_lock_of_live_worker_is_in_progress_dead_one_is_not(tmp_path):
    spec, study = R("rtn", "int4"), S()
    assert not accuracy.run.in_progress(spec, study, tmp_path)
    lock = accuracy.run.lock_path(spec, study, tmp_path)
    lock.write_text(str(os.getpid()))
    assert accuracy.run.in_progress(spec, study, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())
    assert not accuracy.run.in_progress(spec, study, tmp_path)


# -- plan and keys ------------------------------------------------------------------------------------

def test_full_model_by_default_and_quick_stays_one_layer():
    assert S().max_layers is None and "all 30" in S().layers_text
    assert accuracy.plan.QUICK.max_layers == 1 and "first 1 of 30" in accuracy.plan.QUICK.layers_text


def test_plan_priority_order_and_sizes():
    plan = accuracy.plan.parts(False)
    assert list(plan) == ["main", "g64", "slac", "dint", "zeroshot", "family", "noise", "static", "gptq", "twolevel"]
    assert plan["main"][0] == R("aqas", "dint4-a")  # timed first: it sizes the plan
    assert len(plan["main"]) == 13 and len(set(plan["main"])) == 13
    assert {(s.method, s.format) for s in plan["main"][1:]} >= {(m, f) for m in accuracy.plan.MAIN_METHODS for f in accuracy.plan.MAIN_FORMATS} - {("aqas", "dint4-a")}
    assert len(plan["g64"]) == 10 and all(s.group_size == 64 or s.method == "fptq" for s in plan["g64"])
    slac = [s for s in plan["slac"] if s.method]
    assert [s.calib_len for s in slac][:2] == [64, 2048]  # the verdict's two runs first
    assert all(s.act_mode == "per-tensor" and s.eval == "slac" for s in slac)


def test_gptq_rotation_and_two_level_parts():
    plan = accuracy.plan.parts(False)
    gptq, two = plan["gptq"], plan["twolevel"]
    assert gptq[:2] == [R("aqas", "dint4-a", group_size=64, rounding="gptq"), R("aqas", "dint4-a", rounding="gptq")]
    assert all(s.rounding == "gptq" and s.format == "dint4-a" for s in gptq)
    # every (method, rotation, granularity) cell once: GPTQ alone and after AQAS, with and without Hadamard
    assert {(s.method, s.rotate, s.group_size) for s in gptq} == \
        {(m, r, g) for m in ("rtn", "aqas") for r in ("none", "hadamard") for g in (None, 64)}
    # two-level vs float group scales at g64 and g32, for dint4-a and int4 (g64 float runs live in the g64 part)
    rows = {s for specs in plan.values() for s in specs}
    for f in ("dint4-a", "int4"):
        for g in (64, 32):
            assert R("aqas", f, group_size=g, scale_scheme="two-level") in rows and R("aqas", f, group_size=g) in rows
    assert R("aqas", "dint4-a", group_size=64, seed=1) in two  # the noise the two-level gap is read against
    assert all(s.group_size in (32, 64) for s in two)


def test_new_spec_fields_keep_old_cache_keys_and_separate_new_runs(tmp_path):
    study = S()
    old = R("aqas", "dint4-a", group_size=64)
    # a run cached before rounding / rotate / scale_scheme existed keeps its file name
    assert accuracy.plan.run_path(old, study, tmp_path).name == "aqas_dint4-a_g64__653ebaba86.json"
    variants = [R("aqas", "dint4-a", group_size=64, rounding="gptq"), R("aqas", "dint4-a", group_size=64, rotate="hadamard"),
                R("aqas", "dint4-a", group_size=64, scale_scheme="two-level")]
    paths = {accuracy.plan.run_path(v, study, tmp_path) for v in variants + [old]}
    assert len(paths) == 4
    assert [v.label for v in variants] == ["aqas dint4-a g64 gptq", "aqas dint4-a g64 hadamard", "aqas dint4-a g64 two-level"]
    # the worker round trip keeps the new fields
    for v in variants:
        job = json.loads(accuracy.run.worker_command(v, study, tmp_path, None)[-1])
        assert accuracy.plan.spec_from_json(job["spec"]) == v


def test_every_committed_run_is_read_by_the_plan():
    runs_dir = Path(accuracy.plan.RESULTS_DIR) / "accuracy_runs"
    planned = {accuracy.plan.run_path(s, S(), runs_dir).name for specs in accuracy.plan.parts(False).values() for s in specs}
    committed = {p.name for p in runs_dir.glob("*.json")}
    assert len(committed) >= 53 and committed <= planned, sorted(committed - planned)


def test_calibration_job_is_a_recipe_the_calibrator_accepts(tmp_path):
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    study = S()
    for spec in {s for specs in accuracy.plan.parts(False).values() for s in specs if s.method is not None}:
        job = accuracy.run.calibration_job(spec, study, tmp_path / "ckpt", False)
        assert job["rotate"] == spec.rotate and job["out"] == str(tmp_path / "ckpt")
        cfg = CalibrationConfig(**job["config"])  # raises RecipeError on a setting calibrate refuses
        assert (cfg.method, cfg.format, cfg.group_size, cfg.rounding, cfg.scale_scheme, cfg.seed) == \
            (spec.method, spec.format, spec.group_size, spec.rounding, spec.scale_scheme, spec.seed or 0)


def test_eval_variants_share_the_calibration_checkpoint_but_not_the_cache_entry(tmp_path):
    study = S()
    a, z = R("aqas", "dint4-a"), R("aqas", "dint4-a", eval="zeroshot")
    assert accuracy.plan.run_path(a, study, tmp_path) != accuracy.plan.run_path(z, study, tmp_path)
    assert accuracy.plan.ckpt_path(a, study, tmp_path) == accuracy.plan.ckpt_path(z, study, tmp_path)
    assert accuracy.plan.ckpt_path(a, study, tmp_path) != accuracy.plan.ckpt_path(R("aqas", "dint4-a", seed=1), study, tmp_path)
    shared = accuracy.plan.shared_calibrations(accuracy.plan.parts(False), study)
    assert accuracy.plan.ckpt_path(a, study, Path(".")).name in shared
    assert accuracy.plan.ckpt_path(R("aqas", "int4"), study, Path(".")).name not in shared


def test_slac_calibration_keeps_the_token_count():
    study = S(slac_tokens=4096)
    for L in (64, 256, 1024, 2048):
        c = accuracy.plan.calib_settings(R("aqas", "dint4-a", calib_len=L), study)
        assert c["seq_len"] == L and c["samples"] * L == 4096
    assert accuracy.plan.calib_settings(R("aqas", "dint4-a"), study)["samples"] == study.samples


# -- verdicts ---------------------------------------------------------------------------------------

def _slac_res(short_on_short: float, long_on_short: float) -> dict:
    mk = lambda L, s, l: (R("aqas", "dint4-a", act_mode="per-tensor", calib_len=L, eval="slac"),  # noqa: E731
                          _rec({"ptb@64": s, "c4@64": s / 3, "ptb@2048": l, "c4@2048": l / 3}))
    return {"slac": [mk(64, short_on_short, 90.0), mk(2048, long_on_short, 80.0)]}


def test_slac_verdict_from_synthetic_records():
    study = S()
    v = accuracy.report.slac_verdict(_slac_res(100.0, 120.0), study)
    assert v["verdict"].startswith("holds") and "(2/2)" in v["verdict"]
    assert any("long target" in d and "90.00" in d and "80.00" in d for d in v["detail"])
    assert accuracy.report.slac_verdict(_slac_res(130.0, 120.0), study)["verdict"].startswith("does not hold")
    assert accuracy.report.slac_verdict({"slac": []}, study)["verdict"].startswith("not tested")


def test_dint_and_aqas_verdicts_count_per_method_format_and_dataset():
    main = [(R(m, f), _rec({"ptb": 100.0 + (0 if f == "dint4-a" else 5) + (0 if m == "aqas" else 3),
                            "c4": 30.0 + (1 if f == "dint4-a" and m == "rtn" else 0)}))
            for m in accuracy.plan.MAIN_METHODS for f in accuracy.plan.MAIN_FORMATS]
    v = {x["claim"].split(" beats")[0]: x["verdict"] for x in accuracy.report.verdicts({"main": main})}
    # dINT wins PTB for all 4 methods; C4: ties (not a win) for 3 methods, loses for rtn -> 4/8
    assert v["dINT4"] == "mixed: holds in 4/8"
    # AQAS wins PTB in every format; C4 ties -> 3/6
    assert v["AQAS"] == "mixed: holds in 3/6"


def test_verdict_wording_and_geo_mean():
    assert accuracy.report._verdict("c", 2, 2, [])["verdict"].startswith("holds")
    assert math.isclose(accuracy.report._mean_ppl([_rec({"ptb": 100.0, "c4": 25.0})], ("ptb", "c4")), 50.0)
    assert math.isnan(accuracy.report._mean_ppl([None], ("ptb",)))


def test_defaults_from_data_ranks_formats_and_methods():
    main = [(R(m, f), _rec({"ptb": {"int4": 120.0, "fp4": 110.0, "dint4-a": 100.0}[f] * (1.0 if m == "aqas" else 1.1),
                            "c4": 30.0})) for m in accuracy.plan.MAIN_METHODS for f in accuracy.plan.MAIN_FORMATS]
    dd = accuracy.report.defaults_from_data({"main": main})
    assert [n for n, _ in dd["format_family"]] == ["dint4-a", "fp4", "int4"]
    assert dd["method"][0][0] == "aqas"


def test_markdown_states_full_model_and_lists_missing_runs():
    study = S()
    res = {part: [(s, None) for s in specs] for part, specs in accuracy.plan.parts(False, study).items()}
    res["main"][1] = (R(None), _rec({"ptb": 66.0, "c4": 25.0}, eval_s=10.0))
    text = accuracy.report.markdown(res, study)
    assert "all 30 decoder layers quantized" in text and "first 2 of 30" not in text
    assert "FP32 baseline: PTB 66.00, C4 25.00" in text
    assert "- main: aqas dint4-a pc" in text  # missing runs are listed under "Not run / cut"
    assert "| fp32 [ppl] | 1 |" in text  # measured runtime table


def test_run_jobs_counts_outside_workers_as_busy_slots(tmp_path, monkeypatch):
    log = tmp_path / "log"
    cmds = [_job(log, i, 0.2) for i in range(3)]
    seen = []
    # one orphaned worker of a previous study holds a slot: with jobs=2 only one new job runs at a time
    accuracy.run.run_jobs(cmds, 2, poll_s=0.02, busy=lambda own: seen.append(set(own)) or 1)
    events = sorted(((line.split()[0], float(line.split()[2])) for line in log.read_text().splitlines()),
                    key=lambda e: (e[1], e[0] == "start"))
    running = peak = 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1 and len(events) == 6
    assert any(seen)  # our own running pids are passed, so they are not counted twice


def test_live_locks_ignores_own_and_dead_pids(tmp_path):
    (tmp_path / "a.lock").write_text(str(os.getpid()))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "b.lock").write_text(dead.stdout.strip())
    assert accuracy.run.live_locks(tmp_path) == 1
    assert accuracy.run.live_locks(tmp_path, {os.getpid()}) == 0


def test_prune_removes_only_entries_the_plan_does_not_read(tmp_path):
    planned = accuracy.plan.run_path(R("rtn", "int4"), S(), tmp_path)
    stale = accuracy.plan.run_path(R("rtn", "int4"), S(max_layers=2), tmp_path)  # the old 2-layer study
    for p in (planned, stale):
        p.write_text("{}")
    assert accuracy.plan.prune_stale(tmp_path) == [stale]
    assert planned.is_file() and not stale.exists()


def test_slac_verdict_averages_seeds_when_a_repeat_ran():
    study = S()
    res = _slac_res(100.0, 120.0)
    # seed 1 of the short calibration is much worse: geo. mean sqrt(100 * 196) = 140 > 120 -> no longer a win
    res["slac"].append((R("aqas", "dint4-a", act_mode="per-tensor", calib_len=64, seed=1, eval="slac"),
                        _rec({"ptb@64": 196.0, "c4@64": 196.0 / 3, "ptb@2048": 90.0, "c4@2048": 30.0})))
    v = accuracy.report.slac_verdict(res, study)
    assert v["verdict"].startswith("does not hold") and "140.00 vs calib 2048 120.00" in v["detail"][0]
    assert "2 / 1 seeds" in v["detail"][0]


def test_report_keeps_blocks_other_scripts_own_in_accuracy_md():
    old = ("# old study text\n\n<!-- peer_llmcompressor: generated by another script -->\n| peer | 1 |\n"
           "<!-- /peer_llmcompressor -->\n")
    new = accuracy.report.keep_foreign_blocks("# new study text\n", old)
    assert new.startswith("# new study text\n") and "old study text" not in new
    assert new.count("<!-- /peer_llmcompressor -->") == 1 and "| peer | 1 |" in new
    assert accuracy.report.keep_foreign_blocks("# new\n", "# no block\n") == "# new\n"


def test_failed_evaluation_keeps_the_calibration_for_the_rerun(tmp_path, monkeypatch):
    spec, study, calls = R("rtn", "int4", group_size=64), S(), []

    def fake_calibrate(spec_, study_, out, progress):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"quantization_config": {"group_size": 64}}))
        return {"calibrate_s": 1.0, "calibrate_cpu_s": 2.0, "calibrate_peak_rss_mib": 300.0}

    def broken(*a, **k):
        raise RuntimeError("kernel import failed")

    monkeypatch.setattr(accuracy.run, "_calibrate", fake_calibrate)
    monkeypatch.setattr(accuracy.run, "_evaluate", broken)
    with pytest.raises(RuntimeError):
        accuracy.run.execute(spec, study, False, None, rescue_dir=tmp_path)
    rescued = accuracy.plan.ckpt_path(spec, study, tmp_path)
    assert (rescued / "config.json").is_file() and len(calls) == 1
    monkeypatch.setattr(accuracy.run, "_evaluate", lambda *a, **k: {"ptb": {"ppl": 80.0}})
    rec = accuracy.run.execute(spec, study, False, None, rescue_dir=tmp_path)
    assert len(calls) == 1 and rec["reused_checkpoint"]  # not calibrated again
    assert rec["calibrate_cpu_s"] == 2.0 and rec["results"]["ptb"]["ppl"] == 80.0  # the cost of the kept calibration
    assert not rescued.exists() and not list(tmp_path.glob("*.cost.json"))  # cleaned up once evaluated


def test_recipe_targets_and_two_level_gap_from_synthetic_records():
    study = S()
    fp = _rec({"ptb": 100.0, "c4": 40.0})
    res = {"main": [(R(None), fp), (R("aqas", "dint4-a"), _rec({"ptb": 115.0, "c4": 44.0}))],
           "g64": [(R("aqas", "dint4-a", group_size=64), _rec({"ptb": 110.0, "c4": 42.0}))],
           "gptq": [(R("aqas", "dint4-a", group_size=64, rounding="gptq"), _rec({"ptb": 105.0, "c4": 42.0}, calibrate_cpu_s=9.0)),
                    (R("rtn", "dint4-a", rounding="gptq"), _rec({"ptb": 111.0, "c4": 44.4}))],
           "twolevel": [(R("aqas", "dint4-a", group_size=64, scale_scheme="two-level"), _rec({"ptb": 121.0, "c4": 42.0})),
                        (R("aqas", "dint4-a", group_size=64, seed=1), _rec({"ptb": 111.1, "c4": 42.42}))]}
    best = accuracy.report.best_recipes(res, study)
    # per channel: GPTQ (+11% / +11%) beats AQAS (+15% / +10%) on the geometric mean and meets the +12% target
    assert best["per channel"]["recipe"] == "GPTQ" and best["per channel"]["meets_target"] is True
    # g64: AQAS + GPTQ (+5% / +5%) meets +6%; AQAS alone (+10%) would not
    assert best["g64"]["recipe"] == "AQAS + GPTQ" and best["g64"]["meets_target"] is True
    assert math.isclose(best["g64"]["over_fp32_pct"]["ptb"], 5.0) and best["g64"]["calibration"]["calibrate_cpu_s"] == 9.0
    rows = {(r["recipe"], r["granularity"]): r for r in accuracy.report.recipe_rows(res, study)}
    assert rows[("AQAS", "g64")]["meets_target"] is False and rows[("rotation + GPTQ", "g64")]["meets_target"] is None
    gaps = {g["dataset"]: g["rel"] for g in accuracy.report.two_level_gaps(res, study)}
    assert math.isclose(gaps["ptb"], 0.1) and math.isclose(gaps["c4"], 0.0)  # two-level 121 vs float 110
    noise = {n["dataset"]: n["rel"] for n in accuracy.report.g64_seed_noise(res, study)}
    assert math.isclose(noise["ptb"], 0.01) and math.isclose(noise["c4"], 0.01)
    text = accuracy.report.markdown({**res, **{p: [] for p in ("slac", "dint", "zeroshot", "family", "noise", "static")}}, study)
    assert "**Best measured g64 (dint4-a): AQAS + GPTQ**, PTB 105.00 (+5.0%), C4 42.00 (+5.0%); target +6%: met." in text
    assert "dint4-a g64 PTB 110.00 -> 121.00 (+10.0%)" in text and "PTB 110.00 vs 111.10 (1.0%)" in text
