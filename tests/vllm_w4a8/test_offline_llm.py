"""Offline ``vllm.LLM(...)`` with a w4a8-dint checkpoint, quantization auto-detected from config.json.

Group-64 checkpoint of the real SmolLM2 (the per-group oneDNN path), float32, compiled graph
(vLLM's default): greedy text equals the reference model's, and the engine says which kernel runs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_llm_autodetects_and_matches_reference(group_ckpt, tmp_path, helpers):
    ref = helpers.reference_outputs(group_ckpt.path, group_ckpt.float_dir)
    got = helpers.run_offline_llm(group_ckpt.path, tmp_path, scored_ids=ref["scored_ids"], dtype="float32")
    summary = helpers.check_run_against_reference(got, ref, "vllm.LLM")
    print("vllm.LLM vs reference:", summary, "noise floor:", ref["noise_floor"])
    log = got["log"]
    assert "quantization=w4a8-dint" in log  # auto-detected: no quantization= argument was given
    assert "run the 'onednn-int8' kernel (INT8 activations, per-token, format dint4-a, group 64)" in log
