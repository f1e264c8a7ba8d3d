"""The accuracy study's ``--quick`` mode on the embedded SmolLM2: real calibration, real PTB text.

One module-scoped run (fp32, RTN int4, AQAS int4; first decoder layer quantized; 1k PTB tokens)
feeds every assertion, so the file costs one quick study (~2-3 min on 2 cores).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest



accuracy = sys.modules["accuracy_bench"]  # loaded once by conftest.py


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy_quick")
    assert accuracy.main(["--quick", "--results-dir", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "accuracy_quick.json").read_text())


def _by_label(summary):
    return {r["label"]: r for r in summary["runs"]["quick"]}


@pytest.mark.slow
def test_quick_study_w4a8_degrades_and_aqas_beats_rtn(quick_run):
    _, summary = quick_run
    runs = _by_label(summary)
    fp, rtn, aqas = runs["fp32"]["ppl"]["ptb"], runs["rtn int4 pc"]["ppl"]["ptb"], runs["aqas int4 pc"]["ppl"]["ptb"]
    assert all(math.isfinite(v) for v in (fp, rtn, aqas))
    assert 40 < fp < 120, fp  # SmolLM2-135M PTB ppl is ~68 at seq 512
    # Quantizing one layer to W4A8 costs perplexity; AQAS's searched scales + clips cost less than RTN.
    assert fp < aqas < rtn, (fp, aqas, rtn)
    # The search minimizes the layer's output error. RTN with per-token activations runs no calibration
    # forward since the methods became plug-ins (nothing to measure its layer error on), so only AQAS records one.
    layer = "model.layers.0"
    aqas_err, rtn_err = runs["aqas int4 pc"]["layer_rel_error"][layer], runs["rtn int4 pc"]["layer_rel_error"][layer]
    assert aqas_err is not None and math.isfinite(aqas_err) and 0 < aqas_err < 1
    assert rtn_err is None or aqas_err < rtn_err


@pytest.mark.slow
def test_quick_study_measures_each_calibration_in_its_own_process(quick_run):
    out, _ = quick_run
    recs = {r["label"]: r for r in (json.loads(p.read_text()) for p in (out / "accuracy_runs").glob("*.json"))}
    assert "calibrate_s" not in recs["fp32"]  # nothing to calibrate
    for label in ("rtn int4 pc", "aqas int4 pc"):
        r = recs[label]
        # the child imports torch and loads the 135M model: hundreds of MiB, and CPU time of its own
        assert 200 < r["calibrate_peak_rss_mib"] < 16_000 and r["calibrate_cpu_s"] > 0.5 and r["calibrate_s"] > 0.5
        assert r["calibration"]["rounding"] == "rtn" and r["calibration"]["scale_scheme"] == "float"
    # AQAS searches (forwards on the calibration batch); RTN only rounds
    assert recs["aqas int4 pc"]["calibrate_cpu_s"] > recs["rtn int4 pc"]["calibrate_cpu_s"]


@pytest.mark.slow
def test_quick_study_resumes_from_cache(quick_run):
    out, _ = quick_run
    cached = sorted((out / "accuracy_runs").glob("*.json"))
    assert len(cached) == 3
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert accuracy.main(["--quick", "--results-dir", str(out), "--no-progress", "--report-only"]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # nothing recomputed
    assert not list((out / "accuracy_runs").glob("*.tmp"))


def test_run_keys_separate_settings():
    S, R = accuracy.plan.StudySettings, accuracy.plan.RunSpec
    base = accuracy.plan.run_path(R("aqas", "int4"), S(), Path("/r"))
    assert base == accuracy.plan.run_path(R("aqas", "int4"), S(), Path("/r"))
    others = {accuracy.plan.run_path(R("aqas", "fp4"), S(), Path("/r")), accuracy.plan.run_path(R("awq", "int4"), S(), Path("/r")),
              accuracy.plan.run_path(R("aqas", "int4"), S(max_layers=3), Path("/r")),
              accuracy.plan.run_path(R("aqas", "int4", group_size=64), S(), Path("/r"))}
    assert base not in others and len(others) == 4
    # the float baseline does not depend on calibration settings
    assert accuracy.plan.run_path(R(None), S(), Path("/r")) == accuracy.plan.run_path(R(None), S(samples=99), Path("/r"))


def test_verdict_wording():
    assert accuracy.report._verdict("c", 3, 3, [])["verdict"].startswith("holds")
    assert accuracy.report._verdict("c", 0, 3, [])["verdict"].startswith("does not hold")
    assert accuracy.report._verdict("c", 1, 3, [])["verdict"].startswith("mixed")
    assert accuracy.report._verdict("c", 0, 0, [])["verdict"].startswith("not tested")
