"""Methods as plug-ins: the registry is the one source of names, hooks replace string tests, and a
run whose method and rounding need no activations never runs a calibration forward."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w4a8_dint import method_names
from w4a8_dint.calibrate import methods as M
from w4a8_dint.calibrate.api import calibrate
from w4a8_dint.calibrate.layer import LayerCalibrator
from w4a8_dint.calibrate.recipe import CalibrationConfig, RecipeError
from w4a8_dint.calibrate.stream import LayerStream
from w4a8_dint.checkpoint import load_tensors, read_qconfig, validate_checkpoint
from w4a8_dint.config import ConfigError, W4A8Config

REPO = Path(__file__).resolve().parents[2]
CALIBRATE_DIR = REPO / "calibrate"


def test_registry_is_the_core_name_list_one_module_per_method():
    assert tuple(M.REGISTRY) == method_names.METHODS
    assert tuple(M.ROUNDING_REGISTRY) == method_names.ROUNDINGS
    for name, impl in M.REGISTRY.items():
        assert isinstance(impl, M.Method) and impl.name == name and impl.summary
        assert (CALIBRATE_DIR / "methods" / f"{name}.py").is_file()
    for name, impl in M.ROUNDING_REGISTRY.items():
        assert isinstance(impl, M.Rounding) and impl.name == name and impl.summary


def test_no_method_string_chains_left():
    """A method is an object: nothing outside calibrate/methods/ tests the method's name."""
    names = "|".join(M.REGISTRY)
    pattern = re.compile(rf"""\.method\s*(==|!=)|\.method\s*(in|not in)\s*[(\[{{"']|\bmethod\s*(==|!=|in|not in)\s*\(?\s*["']({names})["']""")
    offenders = []
    for path in list(CALIBRATE_DIR.rglob("*.py")) + [REPO / "w4a8_dint" / "config.py"]:
        if path.is_relative_to(CALIBRATE_DIR / "methods"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_config_validates_names_from_the_same_list():
    for name in M.REGISTRY:
        assert W4A8Config(method=name).method == name
        assert CalibrationConfig(method=name).method_impl is M.REGISTRY[name]
    with pytest.raises(ConfigError, match="method must be one of"):
        W4A8Config(method="gptq")
    with pytest.raises(RecipeError, match="method must be one of"):
        CalibrationConfig(method="nope")
    with pytest.raises(RecipeError, match="rounding must be one of"):
        CalibrationConfig(rounding="stochastic")
    with pytest.raises(ConfigError, match="rounding must be one of"):
        W4A8Config(rounding="stochastic")
    # a checkpoint written before rounding was recorded keeps loading, as "rtn"
    old = W4A8Config(method="aqas").to_dict()
    old.pop("rounding")
    assert W4A8Config.from_dict(old).rounding == "rtn"


def test_recipe_defaults_come_from_the_method_objects():
    assert CalibrationConfig(method="awq").families == M.REGISTRY["awq"].scale_families == ("mean",)
    assert CalibrationConfig(method="aqas").families == ("mean", "max")
    rec = {m: CalibrationConfig(method=m).to_record() for m in M.REGISTRY}
    assert "smoothquant_alpha" in rec["smoothquant"] and "smoothquant_alpha" not in rec["aqas"]
    assert "fptq_bounds" in rec["fptq"] and "fptq_bounds" not in rec["rtn"]
    assert "alpha_grid" in rec["awq"] and "alpha_grid" not in rec["fptq"]
    assert all(r["rounding"] == "rtn" for r in rec.values())
    assert not CalibrationConfig(method="rtn").needs_activations
    assert CalibrationConfig(method="rtn", act_mode="per-tensor").needs_activations  # static scales need max|X|
    assert all(CalibrationConfig(method=m).needs_activations for m in M.REGISTRY if m != "rtn")
    # rounding composes with any method: GPTQ needs the Hessian, so activations, and records its own fields
    gptq = CalibrationConfig(method="rtn", rounding="gptq")
    assert gptq.needs_activations and gptq.rounding_impl is M.ROUNDING_REGISTRY["gptq"]
    assert {"gptq_damp", "gptq_hessian_inputs", "gptq_act_order"} <= set(CalibrationConfig(method="aqas", rounding="gptq").to_record())
    assert "gptq_damp" not in rec["aqas"]
    with pytest.raises(RecipeError, match="gptq_hessian_inputs"):
        CalibrationConfig(rounding="gptq", gptq_hessian_inputs="int4")


def test_cli_choices_and_help_come_from_the_registry():
    import argparse

    from w4a8_dint.calibrate.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    actions = {a.dest: a for a in p._actions}
    assert tuple(actions["method"].choices) == method_names.METHODS
    assert tuple(actions["rounding"].choices) == method_names.ROUNDINGS
    for name, impl in M.REGISTRY.items():
        assert f"{name}: {impl.summary}" in actions["method"].help
    # the registry (and so the CLI's parser) imports no torch: `w4a8 --help` stays instant
    code = "import sys, w4a8_dint.calibrate.methods, w4a8_dint.calibrate.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_docs_method_table_matches_the_registry():
    doc = (REPO / "docs" / "calibrate.md").read_text()
    for table in (M.methods_table(), M.roundings_table()):
        assert table in doc, f"docs/calibrate.md is out of date with the registry; paste:\n{table}"


def test_rtn_with_per_token_activations_runs_no_calibration_forward(tmp_path, monkeypatch):
    """Only the short structure probe is recorded; the layer calibrator never captures; weights equal plain RTN."""
    recorded: list[int] = []
    original = LayerStream.record_calls

    def counting(self, ids):
        recorded.append(int(ids.numel()))
        return original(self, ids)

    monkeypatch.setattr(LayerStream, "record_calls", counting)
    monkeypatch.setattr(LayerCalibrator, "capture", lambda *a, **k: pytest.fail("RTN per-token must not capture activations"))
    out = calibrate(None, tmp_path / "rtn", CalibrationConfig(method="rtn", max_layers=2, progress=False))
    assert recorded == [64]  # the probe only, no calibration batch
    validate_checkpoint(out)
    q = read_qconfig(out)
    assert q.method == "rtn" and q.rounding == "rtn" and q.calibration["activations_collected"] is False
    from w4a8_dint.embedded import embedded_model_dir
    from w4a8_dint.formats import quantize_weight

    name = "model.layers.1.mlp.down_proj"
    w = load_tensors(embedded_model_dir(), [f"{name}.weight"])[f"{name}.weight"].float()
    got = load_tensors(out, [f"{name}.qweight", f"{name}.weight_scale"])
    ref = quantize_weight(w, q.table, -1)
    assert torch.equal(got[f"{name}.qweight"], ref.packed) and torch.equal(got[f"{name}.weight_scale"], ref.scales)
