"""Recipe validation, group-size resolution, calibration windows and SLAC task lengths (real data)."""

from __future__ import annotations

import json

import pytest
import torch

from w4a8_dint.calibrate import data as D
from w4a8_dint.calibrate import slac
from w4a8_dint.calibrate.recipe import CalibrationConfig, RecipeError, fptq_group_size, resolve_group_size
from w4a8_dint.embedded import c4_text, embedded_model_dir, ptb_text
from w4a8_dint.formats import FormatError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "gptq"}, "method must be one of"),
    ({"group_size": 0}, "positive integer or -1"),
    ({"group_size": 33}, "even"),
    ({"act_mode": "per-channel"}, "act mode"),
    ({"samples": 0}, "samples"),
    ({"seq_len": 1}, "seq_len"),
    ({"alpha_grid": (0.5, 1.5)}, "alpha grid"),
    ({"clip_grid": (1.0, 0.0)}, "clip ratios"),
    ({"scale_families": ("median",)}, "scale families"),
    ({"fptq_bounds": (150, 15)}, "FPTQ bounds"),
    ({"propagate": "both"}, "propagate"),
    ({"format": "int3"}, "format"),
])
def test_bad_settings_are_refused_up_front(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        CalibrationConfig(**kwargs)


def test_method_defaults_and_record():
    assert CalibrationConfig(method="awq").families == ("mean",)
    assert CalibrationConfig(method="aqas").families == ("mean", "max")
    assert CalibrationConfig(method="aqas").loss_quantizes_activations and not CalibrationConfig(method="awq").loss_quantizes_activations
    rec = CalibrationConfig(method="fptq").to_record()
    json.dumps(rec)
    assert rec["fptq_bounds"] == [15.0, 150.0] and "alpha_grid" not in rec and "smoothquant_alpha" not in rec
    assert CalibrationConfig(method="aqas").to_record()["alpha_grid"][:3] == [0.0, 0.05, 0.1]


def test_group_size_resolution_never_changes_an_explicit_value():
    smollm = [576, 576, 576, 576, 576, 576, 1536]
    notes: list[str] = []
    assert resolve_group_size(CalibrationConfig(method="fptq"), smollm, notes) == 64 and "using 64" in notes[0]
    assert fptq_group_size([4096, 11008]) == 128
    assert resolve_group_size(CalibrationConfig(method="aqas"), smollm) == -1
    assert resolve_group_size(CalibrationConfig(method="aqas", group_size=64), smollm) == 64
    with pytest.raises(FormatError, match=r"does not divide the input dimension K=576.*\[32, 64\]"):
        resolve_group_size(CalibrationConfig(method="fptq", group_size=128), smollm)


def test_calibration_windows_are_deterministic_per_seed(tokenizer):
    a = D.calibration_data(tokenizer, "c4", 6, 64, seed=0).input_ids
    b = D.calibration_data(tokenizer, "c4", 6, 64, seed=0).input_ids
    c = D.calibration_data(tokenizer, "c4", 6, 64, seed=1).input_ids
    assert a.shape == (6, 64) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < tokenizer.vocab_size + len(tokenizer.get_added_vocab())


def test_calibration_never_reads_evaluation_text(tokenizer):
    assert D.calibration_text("ptb") == ptb_text("train")
    c4 = c4_text()
    assert D.calibration_text("c4") == c4[len(c4) // 2:]
    windows = D.calibration_data(tokenizer, "c4", 8, 64, seed=0).input_ids
    first_half = c4[: len(c4) // 2]
    decoded = tokenizer.decode(windows[0][8:40])
    assert decoded in c4 and decoded not in first_half


def test_text_files_and_too_short_texts(tmp_path, tokenizer):
    p = tmp_path / "cal.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat sat on the mat. " * 40, "Another document here. " * 40]))
    ids = D.calibration_data(tokenizer, str(p), 3, 32, seed=0).input_ids
    assert ids.shape == (3, 32)
    short = tmp_path / "short.txt"
    short.write_text("three words only")
    with pytest.raises(D.CalibrationDataError, match="only 3 tokens"):
        D.calibration_data(tokenizer, str(short), 2, 128, seed=0)


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    ids = torch.arange(100)
    w = D.sample_windows(ids, 4, 16, seed=0, bos_token_id=7)
    assert (w[:, 0] == 7).all() and w.shape == (4, 16)
    assert all(torch.equal(r[1:], torch.arange(int(r[1]), int(r[1]) + 15)) for r in w)  # contiguous text after BOS


def test_task_lengths_are_measured_from_the_task_files(tokenizer):
    piqa, hs5, lm = (slac.task_length(t, tokenizer) for t in ("piqa", "hellaswag-5shot", "ptb"))
    assert 10 < piqa < 100 and hs5 > 4 * piqa and lm == slac.LM_WINDOW
    with pytest.raises(slac.UnknownTask, match="known:"):
        slac.task_length("mmlu-pro", tokenizer)
    table = slac.task_length_table(tokenizer, max_docs=20)
    text = slac.format_task_table(table, "piqa")
    assert "piqa" in text and "<- target" in text and len(table) == len(slac.TASKS)


def test_activation_range_vs_length_curve_on_the_embedded_model(tokenizer):
    rows = slac.activation_range_vs_length(embedded_model_dir(), tokenizer, lengths=(16, 128), token_budget=256, num_layers=2)
    assert [r["length"] for r in rows] == [16, 128] and [r["samples"] for r in rows] == [16, 2]
    for r in rows:
        assert set(r["ranges"]) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
        assert all(0 < v < 1e4 for v in r["ranges"].values()) and r["max"] == max(r["ranges"].values())
    # 16 windows carry 16 sequence starts, 2 windows only 2: the down_proj range reflects that on SmolLM2
    assert rows[0]["ranges"]["mlp.down_proj"] > rows[1]["ranges"]["mlp.down_proj"]
    assert "length" in slac.format_curve(rows, 2)
