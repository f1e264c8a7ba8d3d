"""Tensor parallel on CPU: TP=2 gives the same greedy tokens as TP=1 (and as the reference).

SmolLM2-135M has 9 query / 3 KV heads, which no TP=2 split allows, so the checkpoint is the
real SmolLM2 with zero heads padded to 12 / 4 (the same function; conftest.padded_float_model).
Group 64, with a static scale on the fused qkv input, a smoothing vector shared by gate/up, and
smoothing (plus a static scale) on row-parallel o_proj / down_proj: what TP has to shard --
packed qweight along K for row layers, group scales on both dims, smoothing vectors along K,
per-token scales over the full row (all-gathered absmax).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_tp2_matches_tp1_and_reference(tp_ckpt, tmp_path, helpers):
    ref = helpers.reference_outputs(tp_ckpt.path, tp_ckpt.float_dir)
    tp1 = helpers.run_offline_llm(tp_ckpt.path, tmp_path, scored_ids=ref["scored_ids"], dtype="float32")
    tp2 = helpers.run_offline_llm(tp_ckpt.path, tmp_path, scored_ids=ref["scored_ids"],
                                  env=helpers.engine_env(**TP2_ENV), dtype="float32", tensor_parallel_size=2)
    s1 = helpers.check_run_against_reference(tp1, ref, "TP=1")
    s2 = helpers.check_run_against_reference(tp2, ref, "TP=2")
    print("TP=1:", s1, "TP=2:", s2, "noise floor:", ref["noise_floor"])
    # Same greedy tokens from both vLLM runs wherever the reference is decisive.
    for i, r in enumerate(ref["completions"]):
        d = helpers.decisive_length(r["gaps"])
        assert tp1["completions"][i]["token_ids"][:d] == tp2["completions"][i]["token_ids"][:d]
    assert "tensor_parallel_size=2" in tp2["log"]
