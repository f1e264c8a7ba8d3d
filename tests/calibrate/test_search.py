"""Scale / clip / fake-quant functions on the embedded model's real layer-0 weights and activations."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from w4a8_dint import formats as F
from w4a8_dint.calibrate import search as S
from w4a8_dint.embedded import c4_text, embedded_model_dir
from w4a8_dint.reference import fake_quantize_activation


@pytest.fixture(scope="module")
def layer0():
    """Real q/k/v/down weights of layer 0 and the real input of q/k/v (input RMSNorm of token embeddings)."""
    from transformers import AutoTokenizer

    d = embedded_model_dir()
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        get = lambda n: f.get_tensor(n).float()  # noqa: E731
        emb = get("model.embed_tokens.weight")
        norm_w = get("model.layers.0.input_layernorm.weight")
        w = {n: get(f"model.layers.0.{n}.weight") for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    ids = torch.tensor(AutoTokenizer.from_pretrained(d)(c4_text()[:6000])["input_ids"][:512])
    h = emb[ids]
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    return {"x": x, **w}


def _tie_weight(table: F.CodeTable) -> torch.Tensor:
    """Rows whose scaled values sit exactly on every midpoint of the table (exercises the tie rule)."""
    vals = sorted(table.values[c] for c in table.used_codes)
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    row = torch.tensor(mids + [table.max_positive, -table.max_negative] + [0.0] * (32 - len(mids) - 2))
    return torch.stack([row, -row.flip(0), row * 0.5]) * 2.0  # scale 2 (or 1) keeps the ties exact


@pytest.mark.parametrize("fmt", list(F.FORMATS))
@pytest.mark.parametrize("group", [-1, 64, 32])
def test_fast_weight_fake_quant_is_bit_identical_to_the_format_module(layer0, fmt, group):
    table = F.get_format(fmt)
    w = layer0["mlp.down_proj"][:192, :576]  # K = 576: every group size divides it
    clip = torch.linspace(0.7, 1.0, w.shape[0])
    assert torch.equal(S.fake_quantize_weight(w, table, group), F.fake_quantize(w, table, group))
    assert torch.equal(S.fake_quantize_weight(w, table, group, clip), S.quantize_rows(w, table, group, clip).dequantize())
    ties = _tie_weight(table)
    assert torch.equal(S.fake_quantize_weight(ties, table, -1), F.fake_quantize(ties, table, -1))


@pytest.mark.parametrize("fmt", list(F.FORMATS))
@pytest.mark.parametrize("group", [-1, 64, 32])
def test_fast_quantize_rows_writes_the_format_modules_codes_and_scales(layer0, fmt, group):
    table = F.get_format(fmt)
    w = layer0["mlp.down_proj"][:192, :576].clone()
    w[5] = 0.0  # an all-zero row: zero scales, the code nearest zero
    w[7, :64] = -0.0
    clip = torch.linspace(0.7, 1.0, w.shape[0])
    for rows, ratios, g in ((w, None, group), (w, clip, group), (_tie_weight(table), None, -1)):
        fast = S.quantize_rows(rows, table, g, ratios)
        gs = F.resolve_group_size(rows.shape[1], g)
        ref = F.quantize_weight(rows, table, gs, scales=S.row_clip_scales(rows, table, gs, ratios))
        assert torch.equal(fast.packed, ref.packed) and torch.equal(fast.scales, ref.scales)
        assert fast.group_size == ref.group_size


@pytest.mark.parametrize("mode", ["per-token", "per-tensor"])
def test_fast_activation_fake_quant_is_bit_identical_to_the_reference(layer0, mode):
    x = layer0["x"].clone()
    x[3] = 0.0  # an all-zero token
    scale = torch.tensor([float(x.abs().max()) / 127 * 0.5])  # static scale that saturates the largest values
    assert torch.equal(S.fake_quantize_activation_fast(x, mode, scale), fake_quantize_activation(x, mode, scale))


def test_smoothing_identity_holds_for_every_family(layer0):
    x, w = layer0["x"], layer0["self_attn.q_proj"]
    w_mean, w_max = S.weight_channel_stats([w], -1)
    x_mean, x_max = x.abs().mean(0), x.abs().amax(0)
    st = S.ScaleStats(x_mean, x_max, w_mean, w_max)
    for s in [S.family_scale("mean", 0.5, st), S.family_scale("max", 0.8, st), S.lae_scale(x_max)]:
        assert torch.isfinite(s).all() and (s > 0).all() and s.shape == (576,)
        torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_smoothquant_and_awq_formulas(layer0):
    x, w = layer0["x"], layer0["self_attn.q_proj"]
    x_max, w_max = x.abs().amax(0), w.abs().amax(0)
    s = S.smoothquant_scale(x_max, w_max, 0.5)
    expected = (x_max.sqrt() / w_max.sqrt())
    torch.testing.assert_close(s / s[0], expected / expected[0], rtol=1e-5, atol=0)  # equal up to normalization
    assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-5)  # AWQ's sqrt(max*min) normalization
    w_mean, _ = S.weight_channel_stats([w], -1)
    a = S.awq_scale(x.abs().mean(0), w_mean, 0.0)
    torch.testing.assert_close(a / a[0], (1 / w_mean) / (1 / w_mean[0]), rtol=1e-5, atol=0)


def test_lae_maps_each_channel_range_to_log2_of_two_plus_max(layer0):
    m = layer0["x"].abs().amax(0) * 40  # spread into FPTQ's 15..150 band
    s = S.lae_scale(m)
    torch.testing.assert_close(m / s, torch.log2(2 + m), rtol=1e-6, atol=1e-6)


def test_search_returns_the_best_evaluated_scale_and_never_loses_to_no_smoothing(layer0):
    x, w = layer0["x"], layer0["self_attn.q_proj"]
    table = F.get_format("dint4-a")
    w_mean, w_max = S.weight_channel_stats([w], -1)
    st = S.ScaleStats(x.abs().mean(0), x.abs().amax(0), w_mean, w_max)
    y = x @ w.t()
    seen = []

    def loss(s):
        xq = S.fake_quantize_activation_fast(x / s, "per-tensor", S.static_input_scale(st.x_absmax, s))
        v = float((xq @ S.fake_quantize_weight(w * s, table, -1).t() - y).pow(2).sum())
        seen.append(v)
        return v

    choice = S.search_scale(("mean", "max"), [i / 20 for i in range(21)], st, loss)
    assert choice.loss == min(seen) and choice.loss <= choice.identity_loss
    assert choice.evaluations == len(seen) == 1 + 2 * 13  # coarse 11 + 2 refinements per family
    assert choice.family in ("mean", "max") and choice.loss < 0.9 * choice.identity_loss  # smoothing pays on real data


def test_coarse_to_fine_finds_the_minimum_of_a_unimodal_loss():
    grid = [i / 20 for i in range(21)]
    st = S.ScaleStats(*(torch.linspace(0.5, 2.0, 8),) * 4)
    for target in (0.05, 0.35, 0.6, 1.0):
        choice = S.search_scale(("max",), grid, st, lambda s, t=target: 0.0, full_grid=True)
        assert choice.family == "none"  # ties keep s = 1
        s_by_alpha = {a: S.normalize(S.family_scale("max", a, st)) for a in grid}
        loss = lambda s, t=target: min(abs(a - t) for a, v in s_by_alpha.items() if torch.equal(v, s)) + 0.01  # noqa: E731
        assert S.search_scale(("max",), grid, st, loss).alpha == target


def test_row_clip_search_lowers_the_output_error_per_channel(layer0):
    x, w = layer0["x"], layer0["self_attn.v_proj"]
    table = F.get_format("int4")
    grid = (1.0, 0.9, 0.8, 0.7)
    ratios, before, after = S.search_row_clip(x, w, x @ w.t(), table, -1, grid)
    assert after <= before and after < 0.95 * before
    assert set(ratios.unique().tolist()) <= set(torch.tensor(grid).tolist()) and (ratios < 1).any()
    # the chosen per-row ratios really give the reported error
    assert math.isclose(float((x @ S.fake_quantize_weight(w, table, -1, ratios).t() - x @ w.t()).pow(2).sum()), after, rel_tol=1e-4)


def test_static_input_scale_covers_the_smoothed_range():
    x_max = torch.tensor([1.0, 254.0, 0.5])
    assert float(S.static_input_scale(x_max)) == pytest.approx(2.0)
    assert float(S.static_input_scale(x_max, torch.tensor([1.0, 2.0, 1.0]))) == pytest.approx(1.0)
    assert float(S.static_input_scale(torch.zeros(3))) > 0  # never a zero scale


# -- fast paths equal the straightforward ones (real layer-0 data) --------------------------------

def _row_clip_loop(x, w, y_ref, table, group, grid):
    """The straightforward clip search: one fake-quant and one matmul per ratio, strict improvement."""
    best_err, best = None, torch.ones(w.shape[0])
    for r in sorted(set(grid), reverse=True):
        err = ((x @ S.fake_quantize_weight(w, table, group, torch.full((w.shape[0],), r)).t()) - y_ref).pow(2).sum(0)
        if best_err is None:
            best_err, best = err, torch.full_like(best, r)
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, r), best)
    return best, float(best_err.sum())


def test_batched_weight_fake_quant_is_bit_identical_per_candidate(layer0):
    table = F.get_format("dint4-a")
    w = layer0["self_attn.k_proj"]
    s = torch.stack([torch.ones(576), layer0["x"].abs().amax(0).sqrt(), 1 / (w.abs().mean(0) + 1e-3)])
    clip = torch.tensor([1.0, 0.9, 0.75])[:, None].expand(-1, w.shape[0])
    batched = S.fake_quantize_weight(w[None] * s[:, None, :], table, 64, clip)
    for i in range(len(s)):
        assert torch.equal(batched[i], S.fake_quantize_weight(w * s[i], table, 64, clip[i]))


@pytest.mark.parametrize("name,group", [("self_attn.v_proj", -1), ("self_attn.q_proj", 64)])
def test_vectorised_clip_search_matches_the_ratio_loop(layer0, name, group):
    table = F.get_format("dint4-a")
    x, w = layer0["x"], layer0[name]
    xq = S.fake_quantize_activation_fast(x, "per-token")
    grid = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    y = x @ w.t()
    ref_ratios, ref_after = _row_clip_loop(xq, w, y, table, group, grid)
    for budget in (1 << 26, S.BATCH_ELEMENTS, w.numel()):  # all ratios in one matmul; a few; one per chunk
        ratios, before, after = S.search_row_clip(xq, w, y, table, group, grid, max_elements=budget)
        assert torch.equal(ratios, ref_ratios)
        assert math.isclose(after, ref_after, rel_tol=1e-6)
        assert after < before


def _straight_loss(x, s, w, b, y, table, group, act_mode, x_absmax):
    xs = x / s
    if act_mode is not None:
        xs = S.fake_quantize_activation_fast(xs, act_mode, S.static_input_scale(x_absmax, s))
    return float((torch.nn.functional.linear(xs, S.fake_quantize_weight(w * s, table, group), b) - y).pow(2).sum())


@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor", None])
def test_batched_candidate_losses_match_one_candidate_at_a_time(layer0, act_mode):
    table = F.get_format("dint4-a")
    x, w = layer0["x"], layer0["self_attn.q_proj"]
    b = torch.linspace(-0.1, 0.1, w.shape[0])  # a bias, as OPT-style linears have
    w_mean, w_max = S.weight_channel_stats([w], 64)
    st = S.ScaleStats(x.abs().mean(0), x.abs().amax(0), w_mean, w_max)
    scales = torch.stack([torch.ones(576)] + [S.normalize(S.family_scale(f, a, st)) for f in ("mean", "max") for a in (0.2, 0.5, 0.8)])
    y = x @ w.t()
    xs = S.candidate_inputs(x, scales, act_mode, st.x_absmax)
    for i, s in enumerate(scales):  # the quantized inputs are exactly the single candidate's
        single = x / s if act_mode is None else S.fake_quantize_activation_fast(x / s, act_mode, S.static_input_scale(st.x_absmax, s))
        assert torch.equal(xs[i], single)
    batched = S.linear_losses(xs, scales, [w], [b], y, table, 64)
    straight = torch.tensor([_straight_loss(x, s, w, b, y, table, 64, act_mode, st.x_absmax) for s in scales])
    torch.testing.assert_close(batched, straight, rtol=1e-5, atol=0)  # only the float summation order differs
    assert int(batched.argmin()) == int(straight.argmin())


def test_bf16_search_losses_are_float32_and_close_to_the_float32_losses(layer0):
    """The searches may run their matmuls in bf16 (layer.SEARCH_MATMUL_PRECISION): the losses stay float32 sums
    and move by bf16 rounding only, far less than the spread between candidates."""
    table = F.get_format("dint4-a")
    x, w = layer0["x"], layer0["self_attn.q_proj"]
    w_mean, w_max = S.weight_channel_stats([w], 64)
    st = S.ScaleStats(x.abs().mean(0), x.abs().amax(0), w_mean, w_max)
    scales = torch.stack([torch.ones(576)] + [S.normalize(S.family_scale("mean", a, st)) for a in (0.0, 0.5, 1.0)])
    xs = S.candidate_inputs(x, scales, "per-token", st.x_absmax)
    y = x @ w.t()
    exact = S.linear_losses(xs, scales, [w], [None], y, table, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = S.linear_losses(xs, scales, [w], [None], y, table, 64)
        ratios, _, _ = S.search_row_clip(xs[0], w, y, table, 64, (1.0, 0.9, 0.8))
    assert fast.dtype == torch.float32 and ratios.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=0)
    assert float(exact.max() / exact.min()) > 1.1  # the candidates differ by much more than that


def _search_scale_loop(families, grid, st, loss, full_grid):
    """The straightforward search: one candidate at a time, family by family, keep the first strict minimum."""
    grid = sorted(set(grid))
    ones = torch.ones(576)
    best = (loss(ones), "none", 0.0, ones)
    evaluations = 1
    for family in families:
        losses = {}
        for stage in (range(len(grid)) if full_grid else S.coarse_points(len(grid)), None):
            if stage is None:
                i_best = min(losses, key=losses.get)
                stage = (i_best - 1, i_best + 1)
            for i in stage:
                if i in losses or not 0 <= i < len(grid):
                    continue
                s = S.normalize(S.family_scale(family, grid[i], st))
                losses[i] = loss(s)
                evaluations += 1
                if losses[i] < best[0]:
                    best = (losses[i], family, grid[i], s)
    return best, evaluations


def test_batched_search_makes_the_sequential_choice(layer0):
    table = F.get_format("dint4-a")
    x, w = layer0["x"], layer0["self_attn.v_proj"]
    w_mean, w_max = S.weight_channel_stats([w], 64)
    st = S.ScaleStats(x.abs().mean(0), x.abs().amax(0), w_mean, w_max)
    y = x @ w.t()
    batches = []

    def loss(s):
        return _straight_loss(x, s, w, None, y, table, 64, "per-token", st.x_absmax)

    def batched(s):
        return loss(s)

    def many(scales):
        batches.append(len(scales))
        return S.linear_losses(S.candidate_inputs(x, scales, "per-token", st.x_absmax), scales, [w], [None], y, table, 64)

    batched.many = many
    grid = [i / 20 for i in range(21)]
    for full in (False, True):
        batches.clear()
        seq, fast = (S.search_scale(("mean", "max"), grid, st, f, full_grid=full) for f in (loss, batched))
        (ref_loss, ref_family, ref_alpha, ref_scale), ref_evaluations = _search_scale_loop(("mean", "max"), grid, st, loss, full)
        assert (seq.family, seq.alpha, seq.loss, seq.evaluations) == (ref_family, ref_alpha, ref_loss, ref_evaluations)
        assert (fast.family, fast.alpha, fast.evaluations) == (seq.family, seq.alpha, seq.evaluations)
        assert torch.equal(fast.scale, seq.scale) and fast.family != "none"
        assert math.isclose(fast.loss, seq.loss, rel_tol=1e-5) and math.isclose(fast.identity_loss, seq.identity_loss, rel_tol=1e-5)
        assert sum(batches) == seq.evaluations and len(batches) == (1 if full else 2)  # two batches, not a loop


def test_leading_slice_cuts_batch_tensors_only():
    from collections import namedtuple

    Pair = namedtuple("Pair", "cos sin")
    x, pos, mask = torch.randn(4, 8, 3), torch.arange(8), torch.zeros(4, 1, 8, 8)
    args, kwargs = S.leading_slice(((x, 2.0), {"pe": Pair(x[..., :2], x[..., 1:]), "pos": pos, "mask": mask, "cache": None}), 4, 1)
    assert torch.equal(args[0], x[:1]) and args[1] == 2.0
    assert isinstance(kwargs["pe"], Pair) and torch.equal(kwargs["pe"].sin, x[:1, :, 1:])
    assert kwargs["pos"] is pos and kwargs["mask"].shape == (1, 1, 8, 8) and kwargs["cache"] is None
