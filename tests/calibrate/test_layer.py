"""One layer through the calibrator when no fold is possible: explicit smooth_scale tensors, read back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from w4a8_dint.calibrate.arch import FOLD_EXPLICIT, infer_structure
from w4a8_dint.calibrate.layer import LayerCalibrator
from w4a8_dint.calibrate.recipe import CalibrationConfig
from w4a8_dint.calibrate.stream import LayerCall
from w4a8_dint.calibrate.verify import _install
from w4a8_dint.config import LayerPolicy, W4A8Config


class PostNormGelu(nn.Module):
    """Post-LN residual and a GELU between the linears: neither input can take a folded scale."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc_in = nn.Linear(64, 128)
        self.fc_out = nn.Linear(128, 64)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc_out(nn.functional.gelu(self.fc_in(h)))


@pytest.mark.parametrize("method", ["smoothquant", "aqas", "fptq"])
@torch.no_grad()
def test_explicit_smooth_scales_are_written_and_read_back_exactly(method):
    torch.manual_seed(0)
    fp = PostNormGelu()
    fp.norm.weight.add_(torch.rand(64))
    fp.norm.weight[5] = 40.0  # an outlier channel at fc_in's input: smoothing has something to do
    x = torch.randn(4, 32, 64)
    layer = copy.deepcopy(fp)
    call = LayerCall(("arg", 0), (None,), {})
    structure = infer_structure(layer, lambda: layer(x), x, "blk")
    assert all(g.fold == FOLD_EXPLICIT for g in structure.groups)
    cfg = CalibrationConfig(method=method, act_mode="per-tensor", search_tokens=128)
    from w4a8_dint.formats import get_format

    res = LayerCalibrator(cfg, get_format("dint4-a"), 64 if method == "fptq" else -1, skip=lambda n: False).calibrate(
        layer, "blk", structure, [x], [call], x, call)
    smoothed = [p for p, pol in res.policies.items() if pol.smooth]
    assert "blk.fc_in" in smoothed and res.tensors["blk.fc_in.smooth_scale"].shape == (64,)
    assert all(isinstance(p, LayerPolicy) and p.act_mode == "per-tensor" for p in res.policies.values())
    qcfg = W4A8Config(format="dint4-a", group_size=64 if method == "fptq" else -1, layers=res.policies)
    exact = _install(copy.deepcopy(fp), "blk", res.tensors, qcfg, exact=True)(x)
    y = fp(x)
    err = float((exact - y).norm() / (y - x).norm())
    assert err < 0.1, err
    # the calibrator's own fake-quant forward (used to propagate) is the same math in float
    torch.testing.assert_close(res.next_hidden[0], exact, rtol=1e-3, atol=1e-3)
