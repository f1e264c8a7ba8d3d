"""Offline ``vllm.LLM(...)``, and tensor parallel on CPU: TP=2 gives the same greedy tokens as TP=1.

Checkpoint: group-64 dint4-a of the embedded SmolLM2 with zero heads padded from 9 / 3 to 12 / 4
(query / KV) so that TP=2 can split it -- the same function as the real model (see
conftest.padded_float_model; its reference outputs equal the unpadded checkpoint's). Static scales
on the fused qkv input and on row-parallel down_proj, smoothing vectors on fused and row-parallel
inputs: what TP has to shard -- packed qweight along K for row layers, group scales on both dims,
smoothing vectors along K, per-token scales over the full row (all-gathered absmax).

Quantization is auto-detected from config.json (no ``quantization=`` argument); float32, vLLM's
default compiled graph. The TP=1 engine run is shared by both tests. TP=2 also runs the same padded
model with TWO-LEVEL group-64 scales (integer multiplier x per-channel float; the multipliers shard
with the group scales' layout): it must load and match its own reference (one more engine start, no
second TP=1 run).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def tp_two_level_ckpt(tp_ckpt, helpers, tmp_path_factory):
    """The TP checkpoint's padded float model, group 64 with two-level scales (same overrides)."""
    return helpers.quantize_for_tests(tp_ckpt.float_dir, tmp_path_factory.mktemp("tp2l") / "w4a8-g64-two-level",
                                      group_size=64, overrides=tp_ckpt.overrides, scale_scheme="two-level")


@pytest.fixture(scope="module")
def reference(tp_ckpt, helpers):
    return helpers.reference_outputs(tp_ckpt.path, tp_ckpt.float_dir)


@pytest.fixture(scope="module")
def tp1_run(tp_ckpt, reference, helpers, tmp_path_factory):
    return helpers.run_offline_llm(tp_ckpt.path, tmp_path_factory.mktemp("tp1"), scored_ids=reference["scored_ids"],
                                   dtype="float32")


def test_llm_autodetects_and_matches_reference(tp1_run, reference, helpers):
    summary = helpers.check_run_against_reference(tp1_run, reference, "vllm.LLM")
    print("vllm.LLM vs reference:", summary, "noise floor:", reference["noise_floor"])
    log = tp1_run["log"]
    assert "quantization=w4a8-dint" in log  # auto-detected: no quantization= argument was given
    assert "run the 'onednn-int8' kernel (INT8 activations, per-token, format dint4-a, group 64, float scales)" in log
    assert "run the 'onednn-int8' kernel (INT8 activations, per-tensor, format dint4-a, group 64, float scales)" in log


@pytest.mark.parametrize("scales", ["float", "two-level"])
def test_tp2_matches_tp1_and_reference(scales, request, tp_ckpt, reference, helpers, tmp_path):
    ckpt = tp_ckpt if scales == "float" else request.getfixturevalue("tp_two_level_ckpt")
    ref = reference if scales == "float" else helpers.reference_outputs(ckpt.path, ckpt.float_dir)
    tp2 = helpers.run_offline_llm(ckpt.path, tmp_path, scored_ids=ref["scored_ids"],
                                  env=helpers.engine_env(**TP2_ENV), dtype="float32", tensor_parallel_size=2)
    summary = helpers.check_run_against_reference(tp2, ref, f"TP=2 {scales} scales")
    assert "tensor_parallel_size=2" in tp2["log"]
    assert f"format dint4-a, group 64, {scales} scales)" in tp2["log"]  # the kernel ran this checkpoint's layout
    if scales != "float":
        print(f"TP=2 {scales} vs reference:", summary)
        return
    tp1_run = request.getfixturevalue("tp1_run")
    print("TP=2 vs reference:", summary, "TP=2 vs TP=1:", helpers.compare_scores(tp2["scores"], tp1_run["scores"]))
    # Both vLLM runs give the same greedy tokens wherever the reference is decisive.
    for i, r in enumerate(reference["completions"]):
        d = helpers.decisive_length(r["gaps"])
        assert tp1_run["completions"][i]["token_ids"][:d] == tp2["completions"][i]["token_ids"][:d]
