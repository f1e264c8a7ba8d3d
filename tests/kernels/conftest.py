"""Fixtures for the kernel tests: real SmolLM2 layers and the real activations they see."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from w4a8_dint.embedded import embedded_model_dir, ptb_text


@contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core box two OpenMP threads wait at every GEMM barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_layer_io():
    """Real weights and the real inputs they see on PTB text: {prefix: (weight [N, K], inputs [T, K])}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = embedded_model_dir()
    prefixes = ["model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj"]
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = tok(ptb_text("test")[:4000], return_tensors="pt").input_ids[:, :32]
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, p=p: seen.__setitem__(p, args[0].detach()[0].clone())) for p in prefixes]
    with one_thread(), torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {p: (model.get_submodule(p).weight.detach().clone(), seen[p]) for p in prefixes}
