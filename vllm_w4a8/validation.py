"""Refuse, in vLLM's front-end process and before any engine process starts, a checkpoint that breaks the contract.

vLLM's own loader reports a mismatched tensor as a bare ``AssertionError`` deep in a worker
process (after ~70 s of engine start, buried under "Engine core initialization failed"), or loads
a tensor into the wrong parameter. Here the project's one checkpoint contract
(:func:`w4a8_dint.contract.check`: names, dtypes, shapes against the architecture, act modes,
fused parts, float modules, scale sanity) runs on the directory, so ``vllm serve`` exits at once
with a message that names the tensor and the problem. Only headers and the small scale tensors are read.
"""

from __future__ import annotations

import os
from pathlib import Path

from w4a8_dint.config import W4A8Config
from w4a8_dint.contract import Checkpoint, CheckpointError, check, read_hf_config, read_headers

__all__ = ["CheckpointError", "validate_for_serving"]


def validate_for_serving(model_dir: str | os.PathLike, qconfig: W4A8Config) -> dict[str, int]:
    """Raise :class:`CheckpointError` if ``model_dir`` breaks the contract under ``qconfig`` (the config vLLM parsed).

    Returns ``{"layers": <quantized linears>, "per_tensor": ..., "smooth": ...}``.
    """
    model_dir = Path(model_dir)
    report = check(Checkpoint(model_dir, read_hf_config(model_dir), qconfig, read_headers(model_dir)))
    return {k: report[k] for k in ("layers", "per_tensor", "smooth")}
