"""Real operands for the power model: the embedded model run on real text, and a w4a8-dint checkpoint."""

import numpy as np
import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.embedded import embedded_model_dir
from w4a8_dint.hw_model import operands as O
from w4a8_dint.hw_model.costs import energy_per_mac, netlist_for
from w4a8_dint.hw_model.gatesim import GateNetlist
from w4a8_dint.hw_model.units import spec_from_key

LLAMA_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


@pytest.fixture(scope="module")
def samples():
    return O.collect_samples(None, text="c4", tokens=64, decoder_layers=2)


def test_samples_are_the_real_layer_inputs(samples):
    by_kind = O.samples_by_kind(samples)
    assert set(by_kind) == LLAMA_KINDS
    assert len(by_kind["q_proj"]) == 2 and len(by_kind["lm_head"]) == 1  # first and last decoder layer
    names = [s.name for s in by_kind["down_proj"]]
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.29.mlp.down_proj"]
    for s in samples:
        assert s.x.shape == (64, s.weight.shape[1]) and torch.isfinite(s.x).all()
    # down_proj sees the SwiGLU product: heavy-tailed, unlike the RMS-normed q_proj input
    dp, qp = by_kind["down_proj"][1], by_kind["q_proj"][1]
    kurt = lambda t: float(((t - t.mean()) ** 4).mean() / t.var() ** 2)  # noqa: E731
    assert kurt(dp.x) > kurt(qp.x)


def test_operands_are_what_the_units_would_hold(samples):
    s = O.samples_by_kind(samples)["gate_proj"][0]
    codes = O.weight_operands(spec_from_key("dint4-a/shift/mac"), s)
    ref = F.unpack_codes(F.quantize_weight(s.weight, F.get_format("dint4-a")).packed).numpy()
    assert np.array_equal(codes, ref)
    a = O.activation_operands(spec_from_key("int8/mac"), s)
    assert a.min() >= -127 and a.max() <= 127
    assert (np.abs(a).max(axis=1) == 127).all()  # per-token absmax scaling puts every row's max at 127
    w8 = O.weight_operands(spec_from_key("int8/mac"), s).astype(np.uint8).view(np.int8)
    assert (np.abs(w8.astype(int)).max(axis=1) == 127).all()
    fp = O.weight_operands(spec_from_key("fp16/mac"), s)
    assert np.array_equal(fp.astype(np.uint16).view(np.float16), s.weight.half().numpy())
    # real dINT4 codes crowd around zero: the +-1/2 denormals and 0 are far above uniform (3/16)
    vals = np.array(F.get_format("dint4-a").values)[codes]
    assert (np.abs(vals) <= 0.5).mean() > 0.25


def test_streams_are_deterministic_and_shared_across_units(samples):
    lanes, again = O.draw_lanes(samples, 64, 16, seed=3), O.draw_lanes(samples, 64, 16, seed=3)
    for f in ("sample", "m", "n", "k0"):
        assert np.array_equal(getattr(lanes, f), getattr(again, f))
    s8 = O.real_streams(spec_from_key("int8/mac"), samples, lanes)
    sd = O.real_streams(spec_from_key("dint4-a/shift/mac"), samples, lanes)
    assert np.array_equal(s8["a"], sd["a"])  # same activations, different weight encodings
    assert s8["first"][0].all() and not s8["first"][1:].any()
    with pytest.raises(O.OperandError, match="exceed K"):
        O.draw_lanes(samples, 4, 10_000, seed=0)


def test_real_operands_switch_less_than_uniform_random(samples):
    """Small weights and activations flip fewer bits: the reason real-data power differs from random."""
    lanes = O.draw_lanes(samples, 256, 32, seed=0)
    for key in ("int8/mac", "dint4-a/shift/mac"):
        spec = spec_from_key(key)
        net = GateNetlist(netlist_for(spec, "generic"))
        real = energy_per_mac(net, O.real_streams(spec, samples, lanes))
        rnd = energy_per_mac(net, O.random_streams(spec, 256, 32, seed=0))
        assert real < rnd


# -- a w4a8-dint checkpoint (fixture in conftest.py) --------------------------------------------------

@pytest.mark.slow
def test_checkpoint_operands_come_from_its_codes_and_scales(small_checkpoint):
    checkpoint = small_checkpoint
    from safetensors.torch import load_file

    ck = load_file(str(checkpoint / "model.safetensors"))
    samples = {s.name: s for s in O.collect_samples(checkpoint, text="ptb", tokens=48, decoder_layers=1)}
    q = samples["model.layers.0.self_attn.q_proj"]
    codes = O.weight_operands(spec_from_key("dint4-a/shift/mac"), q)
    assert np.array_equal(codes, F.unpack_codes(ck["model.layers.0.self_attn.q_proj.qweight"]).numpy())
    assert torch.equal(q.smooth, ck["model.layers.0.self_attn.q_proj.smooth_scale"])
    # the unit sees x / smooth, quantized per token
    a = O.activation_operands(spec_from_key("int8/mac"), q)
    x_s = q.x / q.smooth
    exp = torch.round(x_s / (x_s.abs().amax(dim=1, keepdim=True) / 127)).clamp(-127, 127)
    assert np.array_equal(a, exp.numpy().astype(np.int64))
    # per-tensor layer: the checkpoint's static scale, saturating
    d = samples["model.layers.0.mlp.down_proj"]
    a = O.activation_operands(spec_from_key("int8/mac"), d)
    assert np.array_equal(a, torch.round(d.x / 0.05).clamp(-127, 127).numpy().astype(np.int64))
    # the rebuilt float model is the dequantized checkpoint: weights within half a step of the original
    orig = load_file(str(embedded_model_dir() / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    up = samples["model.layers.0.mlp.up_proj"].weight
    step = ck["model.layers.0.mlp.up_proj.weight_scale"]
    assert ((up - orig).abs() <= step * 0.5 + 1e-6).all()
