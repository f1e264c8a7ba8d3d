"""What calibrate refuses before any work starts, and how it stops: each case checks the exact
message, that the CLI prints one line (no traceback, exit 2), that no calibration work started,
and that nothing was written or deleted (source unchanged, no temp dirs next to --out)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from w4a8_dint.calibrate import api, preflight
from w4a8_dint.calibrate.api import calibrate
from w4a8_dint.calibrate.arch import UnsupportedArchitecture
from w4a8_dint.calibrate.recipe import CalibrationConfig
from w4a8_dint.checkpoint import validate_checkpoint
from w4a8_dint.cli import main as w4a8_main
from w4a8_dint.embedded import embedded_model_dir

FAST = ["--method", "rtn", "--samples", "2", "--seq-len", "32", "--max-layers", "1", "--threads", "1", "--quiet"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # the ones it has


def tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` (files with size and mtime): equal before and after means untouched."""
    return {str(p.relative_to(root)): None if p.is_dir() and not p.is_symlink() else (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir())


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` line. Returns that line."""
    capsys.readouterr()  # drop what the fixtures printed
    assert w4a8_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if calibration data is tokenized or a weight is streamed."""
    def started(*args, **kwargs):
        raise AssertionError("calibration work started before the refusal")

    monkeypatch.setattr(api, "calibration_data", started)
    monkeypatch.setattr(api, "LayerStream", started)


def save_tiny(config, out: Path) -> Path:
    """A seeded random model of ``config`` with the embedded tokenizer, written like an HF dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (embedded_model_dir() / f).is_file():
            shutil.copy2(embedded_model_dir() / f, out / f)
    return out


# -- architectures the loaders cannot load ----------------------------------------------------------

def _neox():
    import transformers as T

    return T.GPTNeoXConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=512, bos_token_id=0, eos_token_id=0)


def _bert():
    import transformers as T

    return T.BertConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, is_decoder=True)


@pytest.mark.parametrize("config, message", [
    (_neox, r"^GPTNeoXForCausalLM: the source stores \['lm_head\.weight'\] under other names \(\['embed_out\.weight'\]\); "
            r"transformers renames them on load, but w4a8-dint checkpoints are read by module name"),
    (_bert, r"^BertLMHeadModel: nn\.Linear outside the decoder layers \(bert\.encoder\.layer\) and not in "
            r"modules_to_not_convert \['lm_head'\]: cls\.predictions\.decoder \(the model's output embedding\), "
            r"cls\.predictions\.transform\.dense\. .* would not load$"),
], ids=["gpt-neox-embed_out", "bert-head-transform"])
def test_refuses_an_architecture_whose_checkpoint_would_not_load(tmp_path, config, message, no_work, capsys):
    src = save_tiny(config(), tmp_path / "src")
    before = tree(src)
    with pytest.raises(UnsupportedArchitecture, match=message):
        calibrate(src, tmp_path / "out", CalibrationConfig(method="rtn", samples=2, seq_len=32, progress=False))
    line = refused(["calibrate", str(src), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert re.match(message, line.removeprefix("error: "))
    assert tree(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_linear_outside_the_decoder_kept_float_is_accepted(tmp_path, tiny_models, no_work):
    """The rule is 'not in modules_to_not_convert', not 'named lm_head': skipping the head passes the check."""
    from w4a8_dint.calibrate.stream import build_skeleton
    from w4a8_dint.config import W4A8Config

    sk = build_skeleton(tiny_models("mistral"))  # untied lm_head: a real nn.Linear outside the layers
    preflight.check_architecture(sk, W4A8Config(modules_to_not_convert=["lm_head"]), 2)
    with pytest.raises(UnsupportedArchitecture, match=r"not in modules_to_not_convert \[\]: lm_head \(the model's output embedding\)"):
        preflight.check_architecture(sk, W4A8Config(modules_to_not_convert=[]), 2)


# -- --out ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["source", "inside-source", "symlink-to-source", "cwd",
                                  "contains-cwd", "file"])
def test_refuses_an_out_that_would_destroy_something(tmp_path, tiny_models, case, no_work, monkeypatch, capsys):
    src = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), src)
    (src / "notes.txt").write_text("unrelated file the user keeps next to the model")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("the user's work")
    monkeypatch.chdir(work)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    (tmp_path / "a-file").write_text("not a directory")
    out, expected = {
        "source": (src, f"--out {src} is the source model directory: calibrate would replace the model it reads"),
        "inside-source": (src / "q", f"--out {src / 'q'} is inside the source model directory {src}: "
                                     "write the checkpoint elsewhere"),
        "symlink-to-source": (tmp_path / "link", f"--out {src} is the source model directory"),
        "cwd": (Path("."), f"--out {work} is the current directory: writing the checkpoint there would replace it"),
        "contains-cwd": (Path(".."), f"--out {tmp_path} is a parent of the current directory {work}"),
        "file": (tmp_path / "a-file", f"--out {tmp_path / 'a-file'} is a file, not a directory: "
                                      "calibrate writes a checkpoint directory"),
    }[case]
    before = tree(tmp_path)
    line = refused(["calibrate", str(src), "--out", str(out), "--overwrite", *FAST], capsys)
    assert line.startswith(f"error: {expected}")
    assert tree(tmp_path) == before  # nothing written, nothing deleted, no temp dirs


def test_refuses_an_out_containing_the_source_from_elsewhere(tmp_path, tiny_models, no_work, capsys):
    models = tmp_path / "models"
    src = models / "llama"
    shutil.copytree(tiny_models("llama"), src)
    before = tree(tmp_path)
    line = refused(["calibrate", str(src), "--out", str(models), "--overwrite", *FAST], capsys)
    assert line == (f"error: --out {models} contains the source model directory {src}: "
                    "replacing it would delete the model it reads")
    assert tree(tmp_path) == before


def test_refuses_an_unwritable_out_before_loading_anything(tmp_path, tiny_models, monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was resolved before the write probe")

    monkeypatch.setattr(api, "resolve_model_dir", loaded)
    line = refused(["calibrate", str(tiny_models("llama")), "--out", "/sys/w4a8-preflight-out", *FAST], capsys)
    assert line == ("error: --out /sys/w4a8-preflight-out is not writable: cannot create files in /sys "
                    "(Permission denied)")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = refused(["calibrate", str(tiny_models("llama")), "--out", str(locked / "q"), *FAST], capsys)
        assert line == f"error: --out {locked / 'q'} is not writable: cannot create files in {locked} (Permission denied)"
        assert list(locked.iterdir()) == []


# -- the window length --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--seq-len", "0"], "seq_len must be >= 2, got 0"),  # used to become 512 silently
    (["--seq-len", "1"], "seq_len must be >= 2, got 1"),
    (["--target-len", "0"], "seq_len must be >= 2, got 0"),
    (["--seq-len", "513"], "seq_len 513 exceeds the model's max_position_embeddings (512): calibrate at 512 tokens or fewer"),
])
def test_refuses_a_window_length_the_model_cannot_take(tmp_path, tiny_models, flags, expected, no_work, capsys):
    argv = ["calibrate", str(tiny_models("llama")), "--out", str(tmp_path / "q"), "--method", "rtn", "--quiet", *flags]
    assert refused(argv, capsys) == f"error: {expected}"
    assert list(tmp_path.iterdir()) == []


# -- datasets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("weights.txt", b"text then \xff\xfe binary", "is not UTF-8 text (byte 0xff at offset 10): give a .txt or .jsonl file"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\n\t \n", "is empty"),
    ("blank.jsonl", b'{"text": "  "}\n\n{"text": ""}\n', "is empty (every 'text' field is blank)"),
    ("bad.jsonl", b'{"text": "fine"}\n[1, 2]\n', ", line 2: not a JSON object"),
    ("nofield.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', ", line 2: no string 'text' field"),
])
def test_refuses_a_dataset_file_it_cannot_read_naming_it(tmp_path, tiny_models, name, content, expected, no_work, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(content)
    before = tree(tmp_path)
    line = refused(["calibrate", str(tiny_models("llama")), "--out", str(tmp_path / "q"), "--dataset",
                    str(data / name), *FAST], capsys)
    assert line.startswith(f"error: dataset file {data / name}") and expected in line
    assert tree(tmp_path) == before


# -- signals and stale temp dirs --------------------------------------------------------------------

def test_signals_raise_interrupted_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(preflight.Interrupted, match="interrupted by SIGINT") as info:
        with preflight.stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler interrupts this
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal during cleanup is ignored
    assert info.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_within_seconds_and_the_next_run_cleans_up(tmp_path, capsys):
    out = tmp_path / "q"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # AQAS on one layer: long enough (a search over alphas and clips) to be caught inside the layer loop.
    cmd = [sys.executable, "-m", "w4a8_dint.cli", "calibrate", "--out", str(out), "--method", "aqas", "--samples", "2",
           "--seq-len", "32", "--max-layers", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob(".q.layers-*")):  # the layer loop has started
            assert proc.poll() is None, f"calibration ended before the signal: {proc.communicate()}"
            assert time.time() < deadline
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM; temp files removed, nothing written"
    assert "Traceback" not in err
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temp dir, no lock

    # What a SIGKILLed run leaves behind: its spill dir and a half-written checkpoint dir.
    for stale in (".q.layers-k1ll3d", ".q.partial-k1ll3d"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "layer-00000.safetensors").write_bytes(b"half written")
    assert w4a8_main(["calibrate", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    for stale in (".q.layers-k1ll3d", ".q.partial-k1ll3d"):
        assert f"note: removed {tmp_path / stale}, left by an interrupted run" in captured.err.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert validate_checkpoint(out) and json.loads(captured.out.strip().splitlines()[-1])["quantized_linears"] == 7


def test_an_interrupted_overwrite_gets_the_previous_checkpoint_back(tmp_path, tiny_models, capsys):
    """Killed between moving the old checkpoint aside and renaming the new one in: the old one returns."""
    src = str(tiny_models("llama"))
    out = tmp_path / "q"
    assert w4a8_main(["calibrate", src, "--out", str(out), *FAST]) == 0
    before = tree(out)
    out.rename(tmp_path / ".q.old-12345")
    assert w4a8_main(["calibrate", src, "--out", str(out), *FAST]) == 2  # restored, so it exists and is not empty
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: restored {out} from .q.old-12345, left by an interrupted overwrite",
                   f"error: {out} exists and is not empty (pass overwrite=True / --overwrite)"]
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_second_run_on_the_same_out_is_refused_while_one_holds_it(tmp_path, tiny_models, no_work, capsys):
    out = tmp_path / "q"
    with preflight.claim_output(out, False, print):
        line = refused(["calibrate", str(tiny_models("llama")), "--out", str(out), *FAST], capsys)
        assert line == f"error: another calibrate run is writing {out} (it holds {tmp_path / '.q.lock'})"
    assert list(tmp_path.iterdir()) == []


def test_the_slac_report_waits_for_the_same_checks(tmp_path, tiny_models, no_work, monkeypatch, capsys):
    """--target-len/--target-task print a range-vs-length curve that streams float layers: refused before it."""
    from w4a8_dint.calibrate import cli

    def reported(*args, **kwargs):
        raise AssertionError("the SLAC report streamed layers before the refusal")

    monkeypatch.setattr(cli, "_slac_report", reported)
    src = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), src)
    before = tree(tmp_path)
    line = refused(["calibrate", str(src), "--out", str(src), "--overwrite", "--target-len", "64", "--method", "rtn"], capsys)
    assert line == f"error: --out {src} is the source model directory: calibrate would replace the model it reads"
    assert tree(tmp_path) == before
