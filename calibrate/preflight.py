"""What ``calibrate`` refuses, checked before any weight is streamed, and how it stops cleanly.

Every check here is cheap (config, meta skeleton, shard headers, one probe file) and raises with
one line that names the problem, so a run that cannot deliver a loadable checkpoint fails in
seconds instead of after the work, and nothing is written or deleted first:

* the architecture: decoder layers of ``nn.Linear`` + norms only; every model parameter stored
  under its module name (transformers renames legacy names such as GPT-NeoX's ``embed_out`` on
  load, our loaders read by name); every ``nn.Linear`` outside the decoder layers kept float by
  ``modules_to_not_convert`` (the loaders quantize every other linear, the calibrator never does);
* ``--out``: not a file, not the source model or the current directory, not inside or around
  them, writable (a probe file is created and removed);
* the window length: at least 2 tokens, at most the model's positions;
* a dataset file: UTF-8 text with something in it.

While it runs, SIGTERM/SIGINT raise :class:`Interrupted` so the temp dirs are removed on the way
out, and a lock per ``--out`` lets the next run remove temp dirs a killed run left behind.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.nn as nn

from w4a8_dint.config import W4A8Config
from w4a8_dint.contract import float_modules

from .arch import UnsupportedArchitecture, check_supported
from .data import CalibrationDataError
from .stream import CalibrationError, ModelSkeleton

# Temp dirs a run makes next to --out: the layer spill (api), the checkpoint being assembled and
# the previous checkpoint during an overwrite (checkpoint.atomic_directory).
TEMP_KINDS = ("layers", "partial", "old")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_CHUNK = 1 << 20


class PreflightError(CalibrationError):
    """The run cannot deliver a usable checkpoint; refused before any work starts."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; raised where the main thread is, so cleanup code runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# -- --out ----------------------------------------------------------------------------------------

def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output(out: Path, overwrite: bool) -> None:
    """``out`` (resolved) is a directory we may write: not a file, not the cwd or above it, writable."""
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--out {out} is a file, not a directory: calibrate writes a checkpoint directory")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        what = "the current directory" if out == cwd else f"a parent of the current directory {cwd}"
        raise PreflightError(f"--out {out} is {what}: writing the checkpoint there would replace it")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    check_writable(out)


def check_output_vs_source(out: Path, model_dir: Path) -> None:
    """``out`` must be neither the source model directory, nor inside it, nor above it."""
    src = Path(model_dir).resolve()
    if out == src:
        raise PreflightError(f"--out {out} is the source model directory: calibrate would replace the model it reads")
    if _is_within(out, src):
        raise PreflightError(f"--out {out} is inside the source model directory {src}: write the checkpoint elsewhere")
    if _is_within(src, out):
        raise PreflightError(f"--out {out} contains the source model directory {src}: "
                             "replacing it would delete the model it reads")


def check_writable(out: Path) -> None:
    """Create and remove a probe file where the temp dirs will go (the nearest existing ancestor)."""
    base = out.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise PreflightError(f"--out {out}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=base)
    except OSError as e:
        raise PreflightError(f"--out {out} is not writable: cannot create files in {base} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


# -- the model ------------------------------------------------------------------------------------

def max_positions(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, config) -> None:
    if seq_len < 2:
        raise PreflightError(f"seq_len {seq_len}: a calibration window needs at least 2 tokens")
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise PreflightError(f"seq_len {seq_len} exceeds the model's max_position_embeddings ({limit}): "
                             f"calibrate at {limit} tokens or fewer")


def check_architecture(skeleton: ModelSkeleton, rules: W4A8Config, quantized_layers: int) -> None:
    """Refuse a model whose checkpoint the HF / vLLM loaders could not load back (see module docstring)."""
    model = skeleton.model
    arch = type(model).__name__
    for i in range(quantized_layers):
        check_supported(skeleton.layers[i], skeleton.layer_prefix(i))  # parameters only: works on meta
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [n for n, _ in model.named_parameters() if n not in skeleton.checkpoint_names and n not in tied]
    if missing:
        unmatched = sorted(set(skeleton.source_names) - set(skeleton.checkpoint_names.values()))
        raise UnsupportedArchitecture(
            f"{arch}: the source stores {missing[:4]} under other names ({unmatched[:4]}); transformers renames "
            "them on load, but w4a8-dint checkpoints are read by module name, so the result would not load"
        )
    # The float-only modules are the contract's rule (contract.float_modules); here only the
    # linears among them matter, since the loaders would expect a quantized linear unless it is skipped.
    modules = dict(model.named_modules())
    outside = [name + (f" ({why})" if "embedding" in why else "")
               for name, why in sorted(float_modules(model, skeleton.layers_name).items())
               if isinstance(modules.get(name), nn.Linear) and not rules.is_skipped(name)]
    inside = skeleton.layers_name + "."
    if outside:
        kept = [m for m in rules.modules_to_not_convert if not m.startswith(inside)]  # not the --max-layers ones
        raise UnsupportedArchitecture(
            f"{arch}: nn.Linear outside the decoder layers ({skeleton.layers_name}) and not in modules_to_not_convert "
            f"{kept}: {', '.join(outside)}. calibrate quantizes decoder-layer "
            "linears only and the loaders would expect these quantized, so the result would not load"
        )


# -- the dataset ----------------------------------------------------------------------------------

def check_dataset(dataset: str) -> None:
    """A dataset file must be UTF-8 text (a .jsonl: one object with a string ``text`` per line), not empty."""
    from w4a8_dint.embedded import DATASETS

    path = Path(dataset)
    if dataset in DATASETS or not path.is_file():
        return  # named sets are shipped; an unknown name is reported by load_text with the choices
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as e:
                at = offset + e.start
                raise CalibrationDataError(f"dataset file {path} is not UTF-8 text (byte 0x{chunk[e.start]:02x} at "
                                           f"offset {at}): give a .txt or .jsonl file") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CalibrationDataError(f"dataset file {path} is not UTF-8 text (it ends inside a character)") from None
    if not has_text:
        raise CalibrationDataError(f"dataset file {path} is empty")
    if path.suffix == ".jsonl":
        _check_jsonl(path)


def _check_jsonl(path: Path) -> None:
    has_text = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise CalibrationDataError(f"dataset file {path}, line {number}: not a JSON object") from None
            if not isinstance(text, str):
                raise CalibrationDataError(f"dataset file {path}, line {number}: no string 'text' field")
            has_text = has_text or bool(text.strip())
    if not has_text:
        raise CalibrationDataError(f"dataset file {path} is empty (every 'text' field is blank)")


# -- while running --------------------------------------------------------------------------------

@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """SIGTERM/SIGINT raise :class:`Interrupted` in the main thread (once: cleanup is not interrupted again).

    Python runs the handler between bytecodes, so the Python loops (layers, search grids) stop
    after the torch op in flight; outside the main thread signals cannot be handled and this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def temp_dirs(out: Path) -> list[Path]:
    """Temp dirs of runs writing ``out`` (see :data:`TEMP_KINDS`)."""
    name = glob.escape(out.name)
    return sorted(p for kind in TEMP_KINDS for p in out.parent.glob(f".{name}.{kind}-*") if p.is_dir())


def remove_stale(out: Path) -> list[str]:
    """Clean up after killed runs for ``out``; returns what was done, one line each.

    A ``.old-`` dir is the previous checkpoint of an interrupted overwrite: put back when ``out``
    is gone (the rename of the new one never happened), else the leftover of its removal.
    """
    done = []
    for path in temp_dirs(out):
        if path.name.startswith(f".{out.name}.old-") and not out.exists():
            path.rename(out)
            done.append(f"restored {out} from {path.name}, left by an interrupted overwrite")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted run")
    return done


@contextlib.contextmanager
def claim_output(out: Path, overwrite: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold a lock on ``out`` for the run; stale temp dirs of earlier runs are removed first.

    Holding the lock proves no live run writes ``out``, so whatever temp dirs exist are stale.
    A restored previous checkpoint is checked like any existing ``out`` (``overwrite``).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PreflightError(f"another calibrate run is writing {out} (it holds {lock})") from None
    try:
        for line in remove_stale(out):
            say(f"note: {line}")
        check_output(out, overwrite)
        yield
    finally:
        # A signal can land between a mkdtemp and the try/with that would remove it: sweep our own.
        remove_stale(out)
        lock.unlink(missing_ok=True)
        os.close(fd)
