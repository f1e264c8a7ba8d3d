"""Smoothing groups inferred from data flow, on every supported architecture, and folds that are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from w4a8_dint.calibrate.arch import (
    FOLD_EXPLICIT, FOLD_LINEAR, FOLD_NORM, UnsupportedArchitecture, constrain, first_tensor, fold_into_source,
    infer_structure, scale_linear_inputs,
)
from w4a8_dint.calibrate.stream import LayerStream, build_skeleton

LLAMA_LIKE = [
    (FOLD_NORM, "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    (FOLD_LINEAR, "self_attn.v_proj", ("self_attn.o_proj",), None),
    (FOLD_NORM, "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    (FOLD_LINEAR, "mlp.up_proj", ("mlp.down_proj",), None),
]
EXPECTED = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE,
    "gemma3": [LLAMA_LIKE[0], LLAMA_LIKE[1], (FOLD_NORM, "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
               LLAMA_LIKE[3]],
    "opt": [
        (FOLD_NORM, "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        (FOLD_LINEAR, "self_attn.v_proj", ("self_attn.out_proj",), None),
        (FOLD_NORM, "final_layer_norm", ("fc1",), None),
        (FOLD_LINEAR, "fc1", ("fc2",), None),  # ReLU is positively homogeneous: foldable
    ],
}


def _layer(model_dir, tokens: int = 32):
    sk = build_skeleton(model_dir)
    st = LayerStream(sk, model_dir, torch.device("cpu"))
    st.load_outer_modules()
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    h, calls = st.record_calls(ids)
    return sk, st.materialize(0), h, calls[0]


@pytest.mark.parametrize("arch", list(EXPECTED))
@torch.no_grad()
def test_groups_and_folds_are_inferred_from_data_flow(tiny_models, arch):
    sk, layer, h, call = _layer(tiny_models(arch))
    structure = infer_structure(layer, lambda: call(layer, h), h, sk.layer_prefix(0))
    got = [(g.fold, g.source, g.linears, g.block) for g in structure.groups]
    assert got == EXPECTED[arch]
    for g in structure.groups:
        if g.fold == FOLD_NORM:  # Gemma's RMSNorm computes x_hat * (1 + w): found by the fold check, not by name
            assert g.norm_offset == (1.0 if arch == "gemma3" else 0.0)


@pytest.mark.parametrize("arch", list(EXPECTED))
@torch.no_grad()
def test_folding_random_scales_into_every_group_leaves_the_layer_output_unchanged(tiny_models, arch):
    sk, layer, h, call = _layer(tiny_models(arch))
    structure = infer_structure(layer, lambda: call(layer, h), h, sk.layer_prefix(0))
    before = call(layer, h)
    gen = torch.Generator().manual_seed(3)
    for g in structure.groups:
        k = layer.get_submodule(g.linears[0]).in_features
        s = constrain(torch.exp(torch.randn(k, generator=gen)), g.channel_map)  # a wide spread: up to ~20x
        fold_into_source(layer, g, s)
        scale_linear_inputs(layer, g, s)
    after = call(layer, h)
    rel = float((after - before).norm() / (before - h).norm())
    assert rel < 1e-4, rel


@torch.no_grad()
def test_gqa_channel_map_is_measured_to_the_head_layout(tiny_models):
    # tiny llama: 4 query heads, 2 KV heads, head_dim 16 -> o_proj channel h*16+d reads v_proj row (h//2)*16+d
    sk, layer, h, call = _layer(tiny_models("llama"))
    structure = infer_structure(layer, lambda: call(layer, h), h, sk.layer_prefix(0))
    o = structure.group_of("self_attn.o_proj")
    c = torch.arange(64)
    assert torch.equal(o.channel_map, (c // 16 // 2) * 16 + c % 16)
    assert torch.equal(structure.group_of("mlp.down_proj").channel_map, torch.arange(128))


class _PostNorm(nn.Module):
    """The norm output also feeds the residual (post-LN), and a GELU sits between two linears."""

    def __init__(self, act):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc_in = nn.Linear(16, 32)
        self.fc_out = nn.Linear(32, 16)
        self.act = act

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc_out(self.act(self.fc_in(h)))


@pytest.mark.parametrize("act,out_fold", [(nn.ReLU(), FOLD_LINEAR), (nn.GELU(), FOLD_EXPLICIT)])
@torch.no_grad()
def test_unfoldable_sources_fall_back_to_an_explicit_smooth_scale(act, out_fold):
    torch.manual_seed(0)
    layer = _PostNorm(act)
    with torch.no_grad():
        layer.norm.weight.add_(torch.rand(16))
    x = torch.randn(2, 8, 16)
    structure = infer_structure(layer, lambda: layer(x), x, "custom")
    by = {g.linears: g for g in structure.groups}
    assert by[("fc_in",)].fold == FOLD_EXPLICIT  # folding into the norm would change the residual
    assert by[("fc_out",)].fold == out_fold and (out_fold != FOLD_LINEAR or by[("fc_out",)].source == "fc_in")


def test_unsupported_modules_are_named(tiny_models):
    with pytest.raises(UnsupportedArchitecture, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        sk, layer, h, call = _layer(tiny_models("gpt2"))
        infer_structure(layer, lambda: call(layer, h), h, sk.layer_prefix(0))


def test_a_linear_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.lin(x))

    layer, x = Twice(), torch.randn(1, 4, 8)
    with pytest.raises(UnsupportedArchitecture, match="called 2 times"):
        infer_structure(layer, lambda: layer(x), x, "twice")


def test_first_tensor_reads_layer_outputs():
    t = torch.ones(1)
    assert first_tensor(t) is t and first_tensor((None, (t,))) is t and first_tensor({"a": 1, "b": t}) is t
