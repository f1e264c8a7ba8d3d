"""Shared fixtures: tiny random models of every supported architecture, written like real HF dirs.

They use the embedded SmolLM2 tokenizer (vocab 49152), so the calibration data path is the real
one; weights are random but seeded, so every run sees the same model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tiny_config(arch: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        return T.LlamaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return T.MistralConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return T.Qwen2Config(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return T.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=512, enable_bias=True)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    raise KeyError(arch)


def make_tiny_model(arch: str, out: Path, seed: int = 0, poison: str | None = None, shard_size: str | None = None,
                    strip_prefix: bool = False) -> Path:
    """Save a seeded random ``arch`` model to ``out``.

    ``poison`` names a parameter to fill with NaN; ``shard_size`` writes several shards + index;
    ``strip_prefix`` drops the ``model.`` prefix from the tensor names (as some hub checkpoints do).
    """
    from transformers import AutoModelForCausalLM

    from w4a8_dint.embedded import embedded_model_dir

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # give norms a non-trivial weight so folds are really exercised
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower():
                p.add_(torch.rand_like(p) * 0.5)
        if poison:
            model.get_parameter(poison).fill_(float("nan"))
    model.save_pretrained(out, **({"max_shard_size": shard_size} if shard_size else {}))
    if strip_prefix:
        from safetensors.torch import load_file, save_file

        path = out / "model.safetensors"
        tensors = load_file(str(path))
        save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    src = embedded_model_dir()
    for f in TOKENIZER_FILES:
        if (src / f).is_file() and not (out / f).exists():
            shutil.copy2(src / f, out / f)
    return out


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread for these tests (restored after each).

    Calibration runs many small tensor ops; on the shared 2-core CI box, OpenMP synchronization of a
    second thread costs far more than it gains (measured under load: one AQAS layer 31 s with one
    thread, 75 s with two; a tiny-model weight fake-quant 0.5 ms vs 10.7 ms).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``arch -> model dir``, built once per session on first use."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_model(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``make_tiny_model`` for tests that need a model of their own (e.g. with poisoned weights)."""
    return make_tiny_model

