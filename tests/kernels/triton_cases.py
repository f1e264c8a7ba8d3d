"""Triton kernels vs the reference, bit for bit. Not collected directly (name has no test_ prefix).

``test_triton_interpreter.py`` runs this file in a subprocess with ``TRITON_INTERPRET=1``
(the variable must be set before triton is imported, and other tests import triton
normally). On a CUDA machine run it natively: ``pytest tests/kernels/triton_cases.py``.

Data is random and never zero (except the one all-zero row that checks scale 1); shapes
are small but odd: M=1, M and N not multiples of the blocks, several K groups, K not a
multiple of BLOCK_K.
"""

import itertools
import os

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.formats import FormatError
from w4a8_dint.kernels import triton_w4a8 as T
from w4a8_dint.reference import int_matmul_grouped, quantize_activation, w4a8_epilogue, w4a8_linear_reference

DEVICE = "cpu" if T.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
FORMATS = sorted(F.FORMATS)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _nonzero_randn(shape, seed, scale=1.0):
    x = torch.randn(*shape, generator=_gen(seed)) * scale
    return torch.where(x == 0, torch.full_like(x, 0.25), x)


def _random_packed(n, k, seed):
    """Uniform random codes 0..15, so every table entry (unused codes included) gets decoded."""
    codes = torch.randint(0, 16, (n, k), generator=_gen(seed), dtype=torch.uint8)
    return F.pack_codes(codes)


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


# -- activation quantization --------------------------------------------------------------

@pytest.mark.parametrize("act_mode", ["per-token", "per-tensor"])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 96), (7, 4100)])  # 4100 > the 4096 block: two K passes with a tail
def test_act_quant_equals_reference(act_mode, smooth, dtype, m, k):
    x = _nonzero_randn((m, k), seed=m + k, scale=4.0).to(dtype)
    sm = (torch.rand(k, generator=_gen(1)) + 0.5).to(dtype) if smooth else None
    xf = x.float() / sm.float() if smooth else x.float()
    inp = torch.tensor([float(xf.abs().max()) / 127 * 0.6]) if act_mode == "per-tensor" else None  # some saturate
    q_ref, s_ref = quantize_activation(xf, act_mode, inp)
    q, s = T.quantize_activation_triton(*_dev(x), act_mode, *_dev(inp, sm))
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def test_act_quant_rounds_half_to_even_and_handles_zero_rows():
    # Row 0: absmax 127 -> scale 1 exactly, so x/scale are the exact ties .5, 1.5, 2.5, -0.5, -2.5.
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0, 127.0])
    x = torch.stack([ties, torch.zeros(8), _nonzero_randn((8,), 3)])
    q, s = T.quantize_activation_triton(*_dev(x), "per-token")
    q_ref, s_ref = quantize_activation(x, "per-token")
    assert q[0].tolist() == [0, 2, 2, 0, -2, 126, -127, 127]
    assert s[1].item() == 1.0 and not q[1].any()  # all-zero token: scale 1, zeros, no NaN
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


# -- GEMM: integer partial sums -------------------------------------------------------------

@pytest.mark.parametrize("decode", [0, 1])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemm_integer_partials_are_exact_per_group(decode, split_k):
    """One-hot group scales and unit act scales make the float output equal one int32 group partial."""
    m, n, k, g = 5, 40, 256, 32  # 8 groups
    q_x = torch.randint(-127, 128, (m, k), generator=_gen(0), dtype=torch.int8)
    packed = _random_packed(n, k, seed=1)
    table = F.get_format("dint4-a")
    acc = int_matmul_grouped(q_x, F.expand_to_int8(packed, table), g)  # [G, M, N] int32
    ones = torch.ones(m, 1)
    for group in (0, 5, 7):
        half = torch.zeros(n, k // g)
        half[:, group] = 1.0
        y = T.w4a8_gemm_triton(*_dev(q_x, ones, packed, half, table.expansion_lut()), g, None, torch.float32,
                               config=T.GemmConfig(16, 32, 32, split_k, decode=decode))
        assert torch.equal(y.cpu(), acc[group].float())


@pytest.mark.parametrize("split_k", [1, 4])
def test_gemm_per_channel_int32_sum_is_exact_at_full_scale(split_k):
    """Saturated operands over K=1024: |acc| ~ 1.8e6 needs exact int32 accumulation (still exact in float32)."""
    m, n, k = 3, 24, 1024
    q_x = torch.full((m, k), 127, dtype=torch.int8)
    q_x[1, ::3] = -127
    q_x[2] = torch.randint(-127, 128, (k,), generator=_gen(2), dtype=torch.int8)
    table = F.get_format("int4")
    codes = torch.full((n, k), 7, dtype=torch.uint8)  # +7 -> int8 14
    codes[::2, 1::2] = 9  # -7
    packed = F.pack_codes(codes)
    want = (q_x.long() @ F.expand_to_int8(packed, table).long().t()).float()
    y = T.w4a8_gemm_triton(*_dev(q_x, torch.ones(m, 1), packed, torch.ones(n, 1), table.expansion_lut()), -1,
                           None, torch.float32, config=T.GemmConfig(16, 16, 64, split_k))
    assert want.abs().max() > 2**20
    assert torch.equal(y.cpu(), want)


# -- GEMM and linear: float output equals the reference bit for bit -------------------------

def _linear_cases():
    """Every format x shape x act mode x split, with smooth/bias, table decode, weight layout and dtype rotating."""
    shapes = [  # (M, N, K, group, blocks)
        (1, 40, 192, -1, (16, 32, 64)),     # per channel, M=1; with split 2 the last K-block is past K (masked)
        (17, 33, 256, 64, (16, 32, 32)),    # M, N not multiples of the block; 4 groups x 2 K-steps
        (5, 48, 160, -1, (16, 32, 64)),     # per channel, K tail (160 = 2.5 blocks)
        (3, 24, 384, 128, (16, 16, 64)),    # 3 groups of 128
        (33, 20, 96, 32, (32, 16, 32)),     # 3 groups, BLOCK_M=32, two M tiles
    ]
    rotating = itertools.cycle(itertools.product(
        [True, False], [1, 0], [True, False], [torch.float32, torch.bfloat16, torch.float16]))
    for fmt, (m, n, k, g, (bm, bn, bk)), act, split in itertools.product(FORMATS, shapes, ["per-token", "per-tensor"], [1, 2]):
        smooth_bias, decode, packed, dtype = next(rotating)
        cfg = T.GemmConfig(bm, bn, bk, split, decode=decode)
        yield pytest.param(
            m, n, k, g, fmt, act, smooth_bias, cfg, packed, dtype,
            id=f"{fmt}-{m}x{n}x{k}-g{g}-{act}-sb{int(smooth_bias)}-s{split}-d{decode}-"
               f"{'packed' if packed else 'int8'}-{str(dtype)[6:]}",
        )


@pytest.mark.parametrize("m,n,k,group,fmt,act_mode,smooth_bias,config,packed,dtype", list(_linear_cases()))
def test_linear_equals_reference_bit_for_bit(m, n, k, group, fmt, act_mode, smooth_bias, config, packed, dtype):
    seed = m * 1000 + n + k
    w = _nonzero_randn((n, k), seed)
    x = _nonzero_randn((m, k), seed + 1, scale=3.0).to(dtype)
    qw = F.quantize_weight(w, F.get_format(fmt), group)
    smooth = (torch.rand(k, generator=_gen(seed)) + 0.5) if smooth_bias else None
    bias = _nonzero_randn((n,), seed + 2) if smooth_bias else None
    xs = x.float() / smooth if smooth_bias else x.float()
    inp = torch.tensor([float(xs.abs().max()) / 127 * 0.8]) if act_mode == "per-tensor" else None
    want = w4a8_linear_reference(x, qw, act_mode, inp, smooth, bias)
    w8, half = qw.int8_expansion()
    weight = qw.packed if packed else w8
    got = T.w4a8_linear_triton(*_dev(x, weight, half, qw.table.expansion_lut()), group, act_mode,
                               *_dev(inp, smooth, bias), config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("m,n,k,group", [(1, 64, 1024, -1), (1, 64, 512, 64), (2, 96, 256, 128), (40, 72, 192, 64)])
def test_heuristic_config_including_split_k_is_exact(m, n, k, group):
    """config=None: the M-bucket heuristic picks blocks and split-K (the interpreter pretends 8 SMs)."""
    cfg = T.heuristic_config(m, n, k, group, torch.device(DEVICE))
    if m == 1:
        assert cfg.split_k > 1  # one output tile on 8 "SMs": K is split
    qw = F.quantize_weight(_nonzero_randn((n, k), m + n), F.get_format("dint4-a"), group)
    x = _nonzero_randn((m, k), k, scale=2.0)
    bias = _nonzero_randn((n,), 7)
    want = w4a8_linear_reference(x, qw, bias=bias)
    got = T.w4a8_linear_triton(*_dev(x, qw.packed, qw.scales * 0.5, qw.table.expansion_lut()), group,
                               bias=bias.to(DEVICE))
    assert torch.equal(got.cpu(), want)


def test_gemm_epilogue_order_matches_reference_on_tied_sums():
    """Many groups with scales spanning 2**-20..2**4: float re-association would change the last bits."""
    m, n, k, g = 4, 16, 512, 32  # 16 groups
    q_x = torch.randint(-127, 128, (m, k), generator=_gen(5), dtype=torch.int8)
    packed = _random_packed(n, k, seed=6)
    table = F.get_format("fp4")
    half = torch.exp2(torch.randint(-20, 5, (n, k // g), generator=_gen(7)).float()) * (1 + torch.rand(n, k // g, generator=_gen(8)))
    s_x = torch.rand(m, 1, generator=_gen(9)) + 0.01
    want = w4a8_epilogue(int_matmul_grouped(q_x, F.expand_to_int8(packed, table), g), half, s_x)
    for split in (1, 4):
        y = T.w4a8_gemm_triton(*_dev(q_x, s_x, packed, half, table.expansion_lut()), g, None, torch.float32,
                               config=T.GemmConfig(16, 16, 32, split))
        assert torch.equal(y.cpu(), want)


# -- two-level scales: decode -> table -> x m in registers, one per-channel epilogue -----------------

@pytest.mark.parametrize("m,n,k,group,fmt,act_mode,config,dtype", [
    (1, 40, 192, 32, "dint4-a", "per-token", T.GemmConfig(16, 32, 32, 2), torch.float32),  # split-K, int32 sum
    (17, 33, 256, 64, "int4", "per-tensor", T.GemmConfig(16, 32, 64, 1, decode=1), torch.bfloat16),
    (5, 24, 576, 64, "fp4", "per-token", None, torch.float16),  # 9 groups (odd), heuristic config
    (3, 20, 96, 32, "dint4-b", "per-tensor", T.GemmConfig(16, 16, 16, 1), torch.float32),  # 2 blocks per group
])
def test_two_level_linear_equals_reference_bit_for_bit(m, n, k, group, fmt, act_mode, config, dtype):
    seed = m * 1000 + n + k
    qw = F.quantize_two_level(_nonzero_randn((n, k), seed) * 0.1, F.get_format(fmt), group)
    assert int(qw.group_mult.max()) == F.max_group_mult(qw.table)  # the largest multiplier is exercised
    x = _nonzero_randn((m, k), seed + 1, scale=3.0).to(dtype)
    smooth = torch.rand(k, generator=_gen(seed)) + 0.5
    bias = _nonzero_randn((n,), seed + 2)
    xs = x.float() / smooth
    inp = torch.tensor([float(xs.abs().max()) / 127 * 0.8]) if act_mode == "per-tensor" else None
    want = w4a8_linear_reference(x, qw, act_mode, inp, smooth, bias)
    got = T.w4a8_linear_triton(*_dev(x, qw.packed, qw.scales * 0.5, qw.table.expansion_lut()), group, act_mode,
                               *_dev(inp, smooth, bias), config=config, group_mult=qw.group_mult.to(DEVICE))
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got.cpu(), want)


def test_two_level_refuses_int8_weights_and_misshaped_multipliers():
    qw = F.quantize_two_level(_nonzero_randn((8, 64), 3), F.get_format("int4"), 32)
    q = torch.ones(1, 64, dtype=torch.int8)
    w8, half = qw.int8_expansion()
    lut = qw.table.expansion_lut()
    with pytest.raises(FormatError, match="packed codes"):
        T.w4a8_gemm_triton(*_dev(q, torch.ones(1, 1), w8, half, lut), 32, group_mult=qw.group_mult.to(DEVICE))
    with pytest.raises(FormatError, match="group_mult must be"):
        T.w4a8_gemm_triton(*_dev(q, torch.ones(1, 1), qw.packed, half, lut), 32, group_mult=qw.group_mult[:, :1].to(DEVICE))
    with pytest.raises(FormatError, match=r"\[N, 1\]"):
        T.w4a8_gemm_triton(*_dev(q, torch.ones(1, 1), qw.packed, torch.ones(8, 2), lut), 32,
                           group_mult=qw.group_mult.to(DEVICE))


# -- shape rules and config heuristics ----------------------------------------------------------

def test_unsupported_shapes_say_why():
    assert T.unsupported_reason(576, 64) is None and T.unsupported_reason(576, -1) is None
    assert "odd" in T.unsupported_reason(575, -1)
    assert "does not divide" in T.unsupported_reason(576, 128)
    assert "multiple of 16" in T.unsupported_reason(48, 24)
    with pytest.raises(FormatError, match="multiple of 16"):
        T.w4a8_gemm_triton(*_dev(torch.ones(1, 48, dtype=torch.int8), torch.ones(1, 1),
                                 torch.zeros(4, 24, dtype=torch.uint8), torch.ones(4, 2), F.get_format("int4").expansion_lut()), 24)


def test_split_k_heuristic_bounds():
    # Enough tiles: no split. Few tiles: split, a power of two, at most 16.
    assert T.choose_split_k(4096, 4096, 4096, 4096, 128, 128, 128, sms=132) == 1
    s = T.choose_split_k(1, 4096, 4096, 4096, 16, 64, 128, sms=132)
    assert 1 < s <= 16 and s & (s - 1) == 0
    # Group-wise partials cost one int32 per group per output: refused once M > group / 16.
    assert T.choose_split_k(16, 4096, 4096, 128, 16, 64, 128, sms=132) == 1
    assert T.choose_split_k(8, 4096, 4096, 128, 16, 64, 128, sms=132) > 1
    for m in (1, 16, 64, 128, 256, 1024, 4096):
        cfg = T.heuristic_config(m, 4096, 4096, 128, torch.device(DEVICE))
        assert 128 % cfg.block_k == 0 and cfg.block_m <= max(16, 2 * m)


def test_process_runs_the_expected_triton_mode():
    assert T.INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")


def test_gpu_benchmark_script_dry_runs():
    """benchmarks/kernel_bench.py's CUDA path end to end on tiny shapes with a dummy timer (no GPU needed)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    calls = []
    res = kb.bench_cuda((1, 17), {"tiny": (48, 256)}, groups=(-1, 128), device=DEVICE,
                        timer=lambda fn: (fn(), calls.append(1), 2.0)[-1])
    assert len(res["rows"]) == 2 and calls
    for row in res["rows"]:
        for key in ("fp16_ms", "int_mm_w8a8_ms", "w4a8_linear_pc_ms", "w4a8_gemm_g128_ms", "w4a8_gemm_lutload_pc_ms"):
            assert row[key] == 2.0, (key, res["errors"])
        assert row["w4a8_linear_g128_speedup_vs_fp16"] == 1.0
    assert set(res["targets"]) == {"pc", "g128"}
    assert res["exact_vs_reference"] and all(res["exact_vs_reference"].values()), res["exact_vs_reference"]
    assert all(k.startswith("marlin") for k in res["errors"]), res["errors"]  # only the optional baselines may fail


def test_autotune_pruning_keeps_legal_small_configs():
    configs = T.AUTOTUNE_CONFIGS
    kept = T._prune_configs(configs, {"M_BUCKET": 1}, GROUPED=True, GROUP_SIZE=64)
    assert kept and all(64 % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_M"] == 16 for c in kept)
    kept = T._prune_configs(configs, {"M_BUCKET": 8}, GROUPED=False, GROUP_SIZE=1, TWO_LEVEL=True, MULT_GROUP=64)
    assert kept and all(64 % c.kwargs["BLOCK_K"] == 0 for c in kept)  # two-level: BLOCK_K inside a multiplier group
    kept = T._prune_configs(configs, {"M_BUCKET": 4096}, GROUPED=False, GROUP_SIZE=1)
    assert {c.kwargs["BLOCK_M"] for c in kept} >= {64, 128} and 16 not in {c.kwargs["BLOCK_M"] for c in kept}
