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
from safetensors.torch import save_file

from .config import QUANT_METHOD, QWEIGHT, W4A8Config
from .contract import (  # noqa: F401  (CheckpointError, SAFE_INDEX, SINGLE_FILE: re-exported for importers)
    RULES_BY_SUFFIX,
    SAFE_INDEX,
    SINGLE_FILE,
    CheckpointError,
    ModelStructure,
    check,
    check_loaded_tensor,
    layer_dims,
    read_checkpoint_config,
    read_hf_config,
    read_tensors,
    weight_map,
)

# Files copied verbatim from the source model so the checkpoint is self-contained.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
)


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def apply_default_permissions(root: Path) -> None:
    """Dirs ``0o777 & ~umask``, files ``0o666 & ~umask`` (0755 / 0644 under umask 022), like save_pretrained.

    mkdtemp creates 0700 and copied side files keep their source mode; a checkpoint must be readable by
    whoever the umask allows (a serving account), exactly as if it had been written in place.
    """
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        apply_default_permissions(tmp)
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


def _save_canonical(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` with a byte-reproducible header.

    safetensors (0.8, issue safetensors#584) keeps ``__metadata__`` in a Rust ``HashMap`` and writes
    it in that map's per-instance random order, so two saves of the same tensors with 2+ metadata
    keys differ in their header bytes (the tensor data is identical). The header is rewritten in
    place with the metadata keys sorted: same entries, same length, data offsets untouched.
    """
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for the same entries; never leave a header that overruns the data
            raise CheckpointError(f"{path.name}: canonical safetensors header ({len(text)} B) longer than written ({n} B)")
        f.seek(8)
        f.write(text.ljust(n, b" "))  # the format pads headers with spaces


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
        _save_canonical({n: tensors[n].contiguous() for n in names}, out_dir / SINGLE_FILE, meta)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_canonical({n: tensors[n].contiguous() for n in shard}, out_dir / fname, meta)
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
    model_structure: ModelStructure | None = None,
) -> Path:
    """Atomically write a quantized checkpoint: shards, config.json with quantization_config, side files.

    The checkpoint contract (:func:`w4a8_dint.contract.check`) runs on the temp dir before the rename, so
    nothing a loader would refuse ever appears at ``out_dir``. ``model_structure``: the architecture to check
    against when the caller has the model built already (default: built on meta from the config).
    """
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
        validate_checkpoint(tmp, model_structure)
    return Path(out_dir).resolve()


# -- reading: the contract's one reader and one config reader, under their old names ---------------

def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    return read_hf_config(model_dir)


def read_qconfig(model_dir: str | os.PathLike) -> W4A8Config:
    return read_checkpoint_config(model_dir)[1]


def shard_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """Map tensor name -> shard file, checking every shard the index names exists."""
    return weight_map(model_dir)


def load_tensors(model_dir: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load (some of) a checkpoint's tensors, with clear errors for missing names or bad files."""
    return read_tensors(model_dir, names)


def quantized_prefixes(names: list[str] | Mapping[str, Any]) -> list[str]:
    return sorted(n[: -len("." + QWEIGHT)] for n in names if n.endswith("." + QWEIGHT))


def validate_checkpoint(model_dir: str | os.PathLike, model_structure: ModelStructure | None = None,
                        trust_remote_code: bool = False) -> dict[str, Any]:
    """Every rule of the checkpoint contract (:func:`w4a8_dint.contract.check`); returns its report."""
    return check(model_dir, model_structure, trust_remote_code)


def check_layer_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], qcfg: W4A8Config) -> None:
    """One layer's live tensors against the contract's table (dims read off its qweight)."""
    qweight = tensors.get(f"{prefix}.{QWEIGHT}")
    if qweight is None or qweight.dim() != 2:
        raise CheckpointError(f"{prefix}: {QWEIGHT} missing or not 2-D")
    dims = layer_dims(prefix, qweight.shape[0], qweight.shape[1] * 2, qcfg)
    policy = qcfg.policy(prefix)
    for suffix, rule in RULES_BY_SUFFIX.items():
        t = tensors.get(f"{prefix}.{suffix}")
        if rule.wanted(qcfg, policy) != (t is not None):
            raise CheckpointError(f"{prefix}.{suffix}: {'missing' if t is None else 'present'}; it belongs to {rule.when}")
        if t is not None:
            check_loaded_tensor(f"{prefix}.{suffix}", suffix, t, dims, qcfg)
