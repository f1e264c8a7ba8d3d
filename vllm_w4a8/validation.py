"""Refuse, before vLLM starts loading, a checkpoint that does not match its quantization_config.

vLLM's own loader reports a mismatched tensor as a bare ``AssertionError`` deep in
a worker process, or loads a tensor into the wrong parameter. Here every
quantized layer is checked with the project's one validator
(``checkpoint.check_layer_tensors``) in the front-end process, so ``vllm serve``
exits at once with a message that names the layer and the mismatch.

Cost: only safetensors headers are read for the packed weights; the (small)
scale, input-scale and smoothing tensors are read in full so their values can be
checked too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from w4a8_dint.checkpoint import CheckpointError, check_layer_tensors, quantized_prefixes, shard_files
from w4a8_dint.config import INPUT_SCALE, QWEIGHT, SMOOTH_SCALE, WEIGHT_SCALE, W4A8Config

# safetensors header dtype names -> torch dtypes (what checkpoints can hold)
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
_VALUE_CHECKED_SUFFIXES = (WEIGHT_SCALE, INPUT_SCALE, SMOOTH_SCALE)
# vLLM builds these as VocabParallelEmbedding / ParallelLMHead, not LinearBase, so the method is
# never asked to load them: a quantized copy would only fail later, in a worker, as a missing weight.
_FLOAT_ONLY_MODULES = ("lm_head", "embed_tokens", "embed_out", "wte", "word_embeddings")


def _read_layer_tensors(model_dir: Path, wmap: dict[str, str], prefixes: list[str]) -> dict[str, torch.Tensor]:
    """Packed weights as meta tensors (header only); scale-like tensors with their values."""
    wanted = {f"{p}.{QWEIGHT}" for p in prefixes}
    wanted |= {f"{p}.{s}" for p in prefixes for s in _VALUE_CHECKED_SUFFIXES if f"{p}.{s}" in wmap}
    by_file: dict[str, list[str]] = {}
    for name in sorted(wanted):
        if name in wmap:
            by_file.setdefault(wmap[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        path = model_dir / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    if name.endswith("." + QWEIGHT):
                        sl = f.get_slice(name)
                        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float64)
                        out[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
                    else:
                        out[name] = f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types on truncation / corruption
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return out


def validate_for_serving(model_dir: str | os.PathLike, qconfig: W4A8Config) -> dict[str, int]:
    """Raise :class:`CheckpointError` if ``model_dir``'s tensors disagree with ``qconfig``.

    Returns ``{"layers": <quantized linears>, "per_tensor": ..., "smooth": ...}``.
    """
    model_dir = Path(model_dir)
    wmap = shard_files(model_dir)
    prefixes = quantized_prefixes(wmap)
    if not prefixes:
        raise CheckpointError(f"{model_dir}: quantization_config says w4a8-dint but there are no *.{QWEIGHT} tensors")
    heads = [p for p in prefixes if p.rsplit(".", 1)[-1] in _FLOAT_ONLY_MODULES]
    if heads:
        raise CheckpointError(
            f"{model_dir}: {heads[:3]} are quantized, but w4a8-dint serves quantized linear layers only; "
            f"embeddings and lm_head must stay float (recalibrate with them in modules_to_not_convert)"
        )
    skipped = [p for p in prefixes if qconfig.is_skipped(p)]
    if skipped:
        raise CheckpointError(
            f"{model_dir}: {skipped[:3]} are quantized in the checkpoint but listed in "
            f"modules_to_not_convert {qconfig.modules_to_not_convert}"
        )
    tensors = _read_layer_tensors(model_dir, wmap, prefixes)
    for p in prefixes:
        check_layer_tensors(p, tensors, qconfig)
        if qconfig.policy(p).act_mode != "per-tensor" and f"{p}.{INPUT_SCALE}" in wmap:
            # vLLM would have no parameter to load it into and fail with an unrelated error.
            raise CheckpointError(f"{p}: has {INPUT_SCALE} but the config says act_mode={qconfig.policy(p).act_mode!r}")
    unknown = sorted(n for n in qconfig.layers if n not in prefixes)
    if unknown:
        raise CheckpointError(f"{model_dir}: quantization_config.layers names layers without weights: {unknown[:3]}")
    policies = [qconfig.policy(p) for p in prefixes]
    return {
        "layers": len(prefixes),
        "per_tensor": sum(pol.act_mode == "per-tensor" for pol in policies),
        "smooth": sum(pol.smooth for pol in policies),
    }
