"""Results cached by content: the key hashes the bytes of every input (model files, settings, the source of the
code that computes the result), so a hit is exactly what a recomputation would give, and any change misses.

Used by ``w4a8 demo`` for the float model's evaluation and the hardware report. Entries are JSON files under
``<cache_dir>/<kind>/<key>.json`` (``w4a8_dint.embedded.cache_dir``, ``$W4A8_CACHE`` to move it), written
atomically; delete the folder to clear it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Written into a checkpoint after it is made (eval results, model card): not part of what the model computes.
NOT_MODEL_FILES = frozenset({"eval_results.json", "README.md"})
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_digest(model_dir: str | Path) -> str:
    """sha256 over the model directory's files (relative name + content), hidden and non-model files excluded."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a model directory")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or p.name in NOT_MODEL_FILES:
            continue
        h.update(f"{rel}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """sha256 over the source files of the named modules (a package counts with every .py/.json under it)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        origin = Path(spec.origin)
        files = ([origin] if origin.name != "__init__.py"
                 else sorted(p for p in origin.parent.rglob("*") if p.suffix in (".py", ".json")))
        for p in files:
            h.update(f"{name}:{p.name}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def cache_key(**inputs: Any) -> str:
    """One key for JSON-serialisable inputs (digests, settings); order of keywords does not matter."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def entry_path(cache_root: Path, kind: str, key: str) -> Path:
    return Path(cache_root) / kind / f"{key}.json"


def load(cache_root: Path, kind: str, key: str) -> Any | None:
    """The cached value, or ``None`` on a miss (an unreadable entry counts as a miss)."""
    path = entry_path(cache_root, kind, key)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def store(cache_root: Path, kind: str, key: str, value: Any) -> Path:
    path = entry_path(cache_root, kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
