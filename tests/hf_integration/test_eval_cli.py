"""``w4a8 eval --baseline-results``: a baseline evaluated earlier is reused only with the same settings."""

from __future__ import annotations

import argparse
import json

from w4a8_dint.hf_integration import eval_cli

SETTINGS = ["--tasks", "ptb", "--max-tokens", "1100", "--no-progress"]  # 2 windows of 512


def _run(*argv: str) -> int:
    p = argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    return eval_cli.run(p.parse_args(list(argv)))


def test_baseline_results_reused_with_same_settings(tmp_path, fp_dir, capsys):
    first = tmp_path / "fp.json"
    assert _run(str(fp_dir), *SETTINGS, "--output", str(first)) == 0
    capsys.readouterr()
    assert _run(str(fp_dir), "--baseline-results", str(first), *SETTINGS, "--json") == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    earlier = json.loads(first.read_text())["runs"][0]
    assert len(runs) == 2 and runs[0] == earlier
    assert runs[1]["results"]["ptb"]["ppl"] == earlier["results"]["ptb"]["ppl"]  # deterministic: same model, same number


def test_baseline_results_refused_with_other_settings(tmp_path, capsys):
    doc = tmp_path / "fp.json"
    doc.write_text(json.dumps({"runs": [{"model": "m", "settings": {"tasks": ["ptb"], "max_tokens": 2048},
                                         "results": {}}]}))
    assert _run("default", "--baseline-results", str(doc), *SETTINGS) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_tokens=2048 (now 1100)" in err
    (tmp_path / "bad.json").write_text("[]")
    assert _run("default", "--baseline-results", str(tmp_path / "bad.json"), *SETTINGS) == 2
    assert "not a `w4a8 eval --output` document" in capsys.readouterr().err
    assert _run("default", "--baseline", "default", "--baseline-results", str(doc), *SETTINGS) == 2
