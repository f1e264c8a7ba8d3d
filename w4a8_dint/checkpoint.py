"""Reading, writing and validating w4a8-dint checkpoints (safetensors only).

Writes are atomic: everything goes into a temporary sibling directory that is
renamed onto the target at the end, so a killed run never leaves a half
checkpoint. Reads check what a user would otherwise discover as garbage output:
truncated or corrupt shards, a missing shard, wrong dtypes/shapes, a config that
does not match the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import (
    INPUT_SCALE,
    QUANT_METHOD,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_SCALE,
    ConfigError,
    W4A8Config,
)
from .formats import resolve_group_size

SAFE_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim from the source model so the checkpoint is self-contained.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target).resolve()
    if target.exists() and not overwrite and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors_shards(
    out_dir: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = 2 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write tensors as one file or as shards + index (HF naming). Returns the file names."""
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(out_dir / fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    hf_config: dict[str, Any],
    qconfig: W4A8Config,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Atomically write a quantized checkpoint: shards, config.json with quantization_config, side files."""
    cfg = dict(hf_config)
    cfg["quantization_config"] = qconfig.to_dict()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(tmp, tensors, max_shard_bytes, metadata={"quant_method": QUANT_METHOD})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for f in SIDE_FILES:
                src = Path(source_dir) / f
                if src.is_file():
                    shutil.copy2(src, tmp / f)
        validate_checkpoint(tmp)
    return Path(out_dir).resolve()


# -- reading ----------------------------------------------------------------------------

def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def read_qconfig(model_dir: str | os.PathLike) -> W4A8Config:
    cfg = read_config(model_dir)
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{model_dir}: config.json has no quantization_config (not a w4a8-dint checkpoint)")
    try:
        return W4A8Config.from_dict(cfg["quantization_config"])
    except ConfigError as e:
        raise CheckpointError(f"{model_dir}: {e}") from e


def shard_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """Map tensor name -> shard file, checking every shard the index names exists."""
    d = Path(model_dir)
    index = d / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{model_dir}: missing shard(s) named in the index: {missing}")
        return dict(weight_map)
    single = d / SINGLE_FILE
    if not single.is_file():
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise CheckpointError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; w4a8-dint reads safetensors only")
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {SAFE_INDEX}")
    with _open(single) as f:
        return {k: SINGLE_FILE for k in f.keys()}


@contextmanager
def _open(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncation and corruption
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def load_tensors(model_dir: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load (some of) a checkpoint's tensors, with clear errors for missing names or bad files."""
    wmap = shard_files(model_dir)
    wanted = list(wmap) if names is None else names
    missing = [n for n in wanted if n not in wmap]
    if missing:
        raise CheckpointError(f"{model_dir}: tensors missing from checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for n in wanted:
        by_file.setdefault(wmap[n], []).append(n)
    out = {}
    for fname, ns in by_file.items():
        with _open(Path(model_dir) / fname) as f:
            for n in ns:
                try:
                    out[n] = f.get_tensor(n)
                except Exception as e:
                    raise CheckpointError(f"{model_dir}/{fname}: cannot read tensor {n}: {e}") from e
    return out


def quantized_prefixes(names: list[str] | Mapping[str, Any]) -> list[str]:
    return sorted(n[: -len("." + QWEIGHT)] for n in names if n.endswith("." + QWEIGHT))


def validate_checkpoint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Check config and every quantized layer's tensors (names, dtypes, shapes, finiteness).

    Returns a small report ``{"layers": int, "tensors": int, "format": str, "group_size": int}``;
    raises :class:`CheckpointError` naming the first problem found.
    """
    qcfg = read_qconfig(model_dir)
    tensors = load_tensors(model_dir)
    prefixes = quantized_prefixes(tensors)
    if not prefixes:
        raise CheckpointError(f"{model_dir}: quantization_config present but no *.{QWEIGHT} tensors")
    for p in prefixes:
        check_layer_tensors(p, tensors, qcfg)
    extra = [n for n in qcfg.layers if n not in prefixes]
    if extra:
        raise CheckpointError(f"{model_dir}: quantization_config.layers names layers without weights: {extra[:3]}")
    return {"layers": len(prefixes), "tensors": len(tensors), "format": qcfg.format, "group_size": qcfg.group_size}


def check_layer_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], qcfg: W4A8Config) -> None:
    """Raise CheckpointError if ``prefix``'s tensors disagree with the config (used by loaders too)."""
    def get(suffix: str) -> torch.Tensor | None:
        return tensors.get(f"{prefix}.{suffix}")

    qw, ws = get(QWEIGHT), get(WEIGHT_SCALE)
    if qw is None or ws is None:
        raise CheckpointError(f"{prefix}: needs both {QWEIGHT} and {WEIGHT_SCALE}")
    if qw.dtype != torch.uint8 or qw.dim() != 2:
        raise CheckpointError(f"{prefix}.{QWEIGHT}: expected 2-D uint8, got {qw.dtype} {tuple(qw.shape)}")
    n, k = qw.shape[0], qw.shape[1] * 2
    try:
        g = resolve_group_size(k, qcfg.group_size)
    except ValueError as e:
        raise CheckpointError(f"{prefix}: {e}") from e
    if ws.dtype != torch.float32 or tuple(ws.shape) != (n, k // g):
        raise CheckpointError(
            f"{prefix}.{WEIGHT_SCALE}: expected float32 {(n, k // g)} for group size {qcfg.group_size}, "
            f"got {ws.dtype} {tuple(ws.shape)}"
        )
    if not torch.isfinite(ws).all() or (ws < 0).any():
        raise CheckpointError(f"{prefix}.{WEIGHT_SCALE}: non-finite or negative scales")
    pol = qcfg.policy(prefix)
    inp = get(INPUT_SCALE)
    if pol.act_mode == "per-tensor":
        if inp is None or inp.numel() != 1 or not torch.isfinite(inp).all() or float(inp.reshape(())) <= 0:
            raise CheckpointError(f"{prefix}: per-tensor layer needs a positive finite scalar {INPUT_SCALE}")
    sm = get(SMOOTH_SCALE)
    if pol.smooth:
        if sm is None or tuple(sm.shape) != (k,) or not torch.isfinite(sm).all() or (sm <= 0).any():
            raise CheckpointError(f"{prefix}: {SMOOTH_SCALE} must be positive finite float [{k}]")
    elif sm is not None:
        raise CheckpointError(f"{prefix}: has {SMOOTH_SCALE} but the config says smooth=false")
