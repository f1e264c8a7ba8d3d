"""Content-keyed cache: a key changes with any model byte, setting or code file, and only with those."""

from __future__ import annotations

from pathlib import Path

import pytest

from w4a8_dint import content_cache as C


def _model(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    return root


def test_model_digest_follows_model_bytes_only(tmp_path):
    m = _model(tmp_path / "m")
    d0 = C.model_digest(m)
    assert C.model_digest(_model(tmp_path / "copy")) == d0  # same bytes elsewhere: same key
    (m / "eval_results.json").write_text("{}")  # written after the checkpoint is made
    (m / ".partial").write_text("x")
    assert C.model_digest(m) == d0
    (m / "model.safetensors").write_bytes(bytes(range(256)) * 9 + bytes(255) + b"\x01")
    d1 = C.model_digest(m)
    assert d1 != d0
    (m / "model.safetensors").rename(m / "other.safetensors")  # names count, not only contents
    assert C.model_digest(m) not in (d0, d1)
    with pytest.raises(FileNotFoundError):
        C.model_digest(tmp_path / "missing")


def test_code_digest_and_key():
    a = C.code_digest(["w4a8_dint.content_cache"])
    assert a == C.code_digest(["w4a8_dint.content_cache"]) and len(a) == 64
    assert C.code_digest(["w4a8_dint.hw_model"]) != a  # a package hashes its .py and .json files
    with pytest.raises(ModuleNotFoundError):
        C.code_digest(["w4a8_dint.no_such_module"])
    assert C.cache_key(model="x", settings=[1, 2]) == C.cache_key(settings=[1, 2], model="x")
    assert C.cache_key(model="x", settings=[1, 2]) != C.cache_key(model="x", settings=[2, 1])


def test_store_and_load_roundtrip(tmp_path):
    key = C.cache_key(model="m")
    assert C.load(tmp_path, "eval_fp", key) is None
    path = C.store(tmp_path, "eval_fp", key, {"runs": [{"ppl": 1.5}]})
    assert path == C.entry_path(tmp_path, "eval_fp", key) and C.load(tmp_path, "eval_fp", key) == {"runs": [{"ppl": 1.5}]}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left behind
    path.write_text("{truncated")
    assert C.load(tmp_path, "eval_fp", key) is None  # a broken entry is a miss, not an error
