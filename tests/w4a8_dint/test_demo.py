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


def test_calibration_is_reused_for_the_same_inputs_only(tmp_path, monkeypatch):
    """A second run with the same model, flags and code copies the first run's checkpoint instead of calibrating."""
    import sys

    monkeypatch.setattr(demo, "_step", lambda title, cmd: __import__("subprocess").run(cmd, check=True))
    counter = tmp_path / "calls"
    script = tmp_path / "fake_calibrate.py"
    script.write_text("import sys, pathlib\n"
                      f"c = pathlib.Path({str(counter)!r}); c.write_text(str(int(c.read_text() or 0) + 1) if c.exists() else '1')\n"
                      "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(exist_ok=True)\n"
                      "(out / 'config.json').write_text(sys.argv[1])\n")
    cache = tmp_path / "cache"

    def run(flag: str, ckpt: str, use_cache: bool = True) -> bool:
        cmd = [sys.executable, str(script), flag, "--out", str(tmp_path / ckpt), "--overwrite"]
        return demo.calibrate_cached(cmd, tmp_path / ckpt, cache if use_cache else None)

    assert run("--samples=16", "a") is False and counter.read_text() == "1"
    assert run("--samples=16", "b") is True and counter.read_text() == "1"  # other --out: same inputs, a hit
    assert (tmp_path / "b" / "config.json").read_text() == "--samples=16"
    assert run("--samples=32", "c") is False and counter.read_text() == "2"  # other flags: calibrated again
    assert run("--samples=16", "d", use_cache=False) is False and counter.read_text() == "3"  # --no-cache
