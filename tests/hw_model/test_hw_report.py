"""``w4a8 hw-report``: the report from cached synthesis results, per-model MACs, plot, errors, a checkpoint."""

import json

import pytest

from w4a8_dint.cli import main
from w4a8_dint.hw_model import analytic, costs
from w4a8_dint.hw_model.report import PAPER
from w4a8_dint.hw_model.units import spec_from_key

# SmolLM2-135M: hidden 576, 30 layers, 9 heads x 64, 3 KV heads, MLP 1536, vocab 49152 (tied)
H, L, KV, I, V = 576, 30, 3 * 64, 1536, 49152


def run_cli(capsys, *args):
    rc = main(["hw-report", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def report_json():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["hw-report", "--json"]) == 0
    return json.loads(buf.getvalue())


def test_report_ratios_come_from_the_synthesized_numbers(report_json):
    results = costs.load_results()
    h = report_json["headline"]
    dint = results["units"][f"{h['dint_design']}/mac"]
    int8 = results["units"]["int8/mac"]
    assert h["dint_design"].startswith("dint4-a/")  # the default format
    assert h["mac"]["area_saving_vs_int8"] == pytest.approx(int8["transistors"] / dint["transistors"])
    assert 1.0 < h["mac"]["area_saving_vs_int8"] < PAPER["area"]  # what we measured, below the paper's 1.93x
    e = h["mac"]["energy_saving_vs_int8"]
    assert e["zero"]["real"] > 1.0 and e["unit"]["real"] > e["zero"]["real"]  # glitches hit the INT8 array harder
    assert report_json["paper"] == PAPER
    # dINT4 costs about what INT4 costs: the +-1/2 codes are a mux, not a wider multiplier
    assert 0.85 < h["mac"]["area_vs_int4"] < 1.15
    rows = {r["key"]: r for r in report_json["units"]}
    assert rows["fp16/mac"]["area_saving_vs_int8"] < 0.5  # FP16 FMA is several INT8 MACs
    assert rows["int8/mac"]["analytic"]["energy_pj"] == pytest.approx(analytic.energy_pj(spec_from_key("int8/mac")))


def test_report_counts_the_models_macs_per_token(report_json):
    md = report_json["model"]
    kinds = {k["kind"]: k for k in md["kinds"]}
    assert kinds["q_proj"]["macs_per_token"] == H * H * L
    assert kinds["k_proj"]["macs_per_token"] == H * KV * L
    assert kinds["down_proj"]["macs_per_token"] == I * H * L
    assert kinds["lm_head"] == {"kind": "lm_head", "macs_per_token": H * V, "modules": 1, "quantized": False}
    assert md["attention_macs_per_token"] == 2 * 9 * 64 * 512 * L
    zero = md["per_token"]["zero"]
    by = zero["by_kind"]
    assert md["w4a8_scheme"] == "W4A8 dINT4-a"
    assert by["W4A8 dINT4-a"]["lm_head"] == by["W8A8 (INT8 x INT8)"]["lm_head"]  # lm_head stays FP16 in both
    s = zero["quantized_layers_saving_vs_w8a8"]["W4A8 dINT4-a"]
    assert s == pytest.approx(report_json["headline"]["mac"]["energy_saving_vs_int8"]["zero"]["real"], rel=1e-6)
    assert 1.0 < zero["saving_vs_w8a8"]["W4A8 dINT4-a"] < s  # diluted by the FP16 lm_head and attention


def test_text_report_and_plot(capsys, tmp_path):
    png = tmp_path / "hw.png"
    rc, out, err = run_cli(capsys, "--plot", str(png), "--context", "128")
    assert rc == 0
    assert "paper" in out and f"{PAPER['area']:.2f}x" in out and "INT8 x INT8" in out
    assert "energy per token" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_errors_are_clear(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model", str(tmp_path / "nope"))
    assert rc == 1 and "nope" in err
    bad = tmp_path / "results.json"
    bad.write_text("{ truncated")
    rc, _, err = run_cli(capsys, "--results", str(bad))
    assert rc == 1 and "corrupt" in err
    rc, _, err = run_cli(capsys, "--lanes", "0")
    assert rc == 2 and "--lanes" in err


@pytest.mark.slow
def test_report_for_a_checkpoint_measures_its_own_operands(capsys, small_checkpoint):
    rc, out, err = run_cli(capsys, "--model", str(small_checkpoint), "--json", "--lanes", "48", "--cycles", "16",
                           "--context", "64")
    assert rc == 0, err
    rep = json.loads(out)
    md = rep["model"]
    kinds = {k["kind"]: k for k in md["kinds"]}
    assert kinds["q_proj"]["macs_per_token"] == H * H * 2 and kinds["q_proj"]["quantized"]
    assert not kinds["lm_head"]["quantized"]
    assert md["activity"]["model"] == str(small_checkpoint) and md["activity"]["cycles"] == 16
    assert md["designs"]["W4"] == rep["headline"]["dint_design"]  # the checkpoint is dint4-a
    for delay in ("zero", "unit"):
        pt = md["per_token"][delay]
        assert pt["quantized_layers_saving_vs_w8a8"][md["w4a8_scheme"]] > 1.0
        assert pt["saving_vs_fp16"]["W8A8 (INT8 x INT8)"] > 1.0
