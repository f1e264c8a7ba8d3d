"""``w4a8 demo`` pieces that need no model: progress lines with ETA, the summary table, the timing record."""

from __future__ import annotations

import json

from w4a8_dint import demo


def test_progress_eta_counts_remaining_stages(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(demo.time, "monotonic", lambda: now[0])
    p = demo.Progress([("a", "stage A"), ("b", "stage B")], {"a": 60.0, "b": 90.0})
    assert p.eta(0) == 150.0 and p.eta(1) == 90.0
    p.start("a")
    assert "[demo 1/2 | elapsed 0s | ETA 2m30s] stage A (about 1m00s)" in capsys.readouterr().out
    now[0] = 5.0
    p.done(note="x")
    now[0] = 7.0
    p.start("b")
    assert "[demo 2/2 | elapsed 7s | ETA 1m30s] stage B" in capsys.readouterr().out
    now[0] = 30.0
    p.done(cached=True)
    assert [(r["stage"], r["seconds"], r["cached"]) for r in p.rows] == [("a", 5.0, False), ("b", 23.0, True)]
    table = p.table().splitlines()
    assert table[2].startswith("stage A") and table[2].split()[2:4] == ["5.0s", "17%"]
    assert "cache hit" in table[3] and table[-1].split()[:2] == ["total", "30.0s"]


def test_last_estimates_fall_back_to_defaults(tmp_path):
    defaults = {name: float(s) for name, _, s in demo.STAGES}
    assert demo._last_estimates(tmp_path) == defaults
    (tmp_path / "last_timing.json").write_text(json.dumps({"stages": [{"stage": "serve", "seconds": 12.5}]}))
    assert demo._last_estimates(tmp_path) == {**defaults, "serve": 12.5}
    (tmp_path / "last_timing.json").write_text("{broken")
    assert demo._last_estimates(tmp_path) == defaults


def test_record_appends_runs(tmp_path):
    path = tmp_path / "sub" / "demo_timing.json"
    demo._record(path, {"total_s": 1.0})
    demo._record(path, {"total_s": 2.0})
    assert json.loads(path.read_text()) == {"runs": [{"total_s": 1.0}, {"total_s": 2.0}]}


def test_results_summary_lines():
    doc = {"runs": [{"results": {"ptb": {"ppl": 59.0}, "piqa": {"acc": 0.64, "acc_norm": 0.6}}},
                    {"results": {"ptb": {"ppl": 69.21}, "piqa": {"acc": 0.615}}}]}
    lines = demo._results_summary(doc, " Paris.", {"headline": {"area_x": 1.56}})
    assert lines[0] == "ptb ppl: float 59.00 -> W4A8 69.21" and lines[1] == "piqa acc: float 64.0% -> W4A8 61.5%"
    assert lines[2] == "vLLM: 'The capital of France is' -> ' Paris.'" and "1.56" in lines[3]
