"""4-bit-resident CPU W4A8 kernel (``cpu-packed``): the weight stays packed nibbles, bit-exact with the reference.

Why: decode (M <= 8) on CPU is memory bound, and the int8-expansion kernels (``onednn-int8``,
``cpu-int8``) stream 8 bits per weight. This kernel keeps 4 bits per weight resident and decodes
in registers (kernels/csrc/w4a8_cpu_packed.cpp): a byte shuffle through the format's 16-entry
table, then exact integer dot products: AMX (the decoded bytes are exactly the rows of an int8 B tile;
``tdpbssd``, one decoded tile serving up to 48 activation rows), AVX512-VNNI ``vpdpbusd``, AVX2
sign-extended ``vpmaddwd`` (never the saturating ``vpmaddubsw``), scalar C++. The C++ op reports which
ISA path ran, and ``W4A8_CPU_ISA={amx,avx512_vnni,avx2,scalar}`` caps it (tests rerun under each cap).

Resident memory per layer: the packed codes re-laid out in 16-row x 8-column blocks (``N' * K' / 2``
bytes, N' and K' padded to 16 and 8), two-level multipliers one byte per row and group
(``N' * K / G``; 1/32 of the codes at G = 64), one int32 compensation and one float32 half scale
per row. Nothing of size N x K at 8 bits is kept.

Exactness: the op computes the int32 accumulator exactly and multiplies it once by the per-channel
half scale (``fl(float(acc) * s / 2)``, one IEEE rounding, as oneDNN is asked to in ``onednn-int8``);
the rest of the epilogue is ``cpu_onednn.finish_scaled_acc`` (shared with ``onednn-int8``), in the
reference's order. So fp32 and bf16 outputs are bit-identical to ``w4a8_linear_reference``.

Scale schemes: per channel and two-level only. Two-level multipliers are applied in int32 once per
group (``sum_g m_g * sum_k x * 2v``). Float group scales are refused: they need one float scale per
group *inside* the reduction (K / G partial sums each scaled and summed in the reference's order),
which is no longer one integer GEMM; ``onednn-int8`` / ``cpu-int8`` run them.

M buckets (prefill): for M >= :func:`scratch_min_m` (512 rows on the AMX path, 128 on the others) the
op instead decodes the packed weight to a per-call int8 scratch ``[N, K]`` (freed on return, so
resident memory stays 4-bit) and runs one ``torch._int_mm`` (oneDNN: AMX / VNNI), because the
in-register loop re-decodes the weight for every 48 (AMX) or 8 (VNNI) rows. Only where that GEMM is
exact for |w8| <= 127 (VNNI/AMX, ``reference.cpu_int8_gemm_exact_full_range``); elsewhere the exact
loop runs for every M. Measured on the shared 2-core Xeon (AVX512-VNNI + AMX), 4096 x 4096, one
thread, thread CPU ms (scratch = ~3 ms decode + ``torch._int_mm``):

    M                                32      64     128     256     512    1024
    VNNI loop, per-channel         2.86    5.21    9.96   18.69   37.17       -   (loadavg ~10)
    VNNI loop, two-level g64       3.32    6.16   10.59   21.62   44.20       -
    scratch, per-channel           7.48    7.81    8.97   10.95   21.52       -
    scratch, two-level g64         9.04   10.13   11.33   13.88   21.84       -
    AMX loop, per-channel          0.78    1.74       -    6.29       -   47.23   (loadavg ~37)
    oneDNN (AMX, prepacked)        1.51    1.46       -    4.36       -   25.33

Against the int8-expansion kernels (benchmarks/kernel_bench_cpu_packed.py: Llama-7B/8B shapes, GEMM
alone, AMX path, loadavg 52-78, so noisy): M = 1 0.98-1.56x and M = 8 0.88-1.55x ``onednn-int8``
(AMX), 4-7x ``cpu-int8``; M = 64 0.60-1.41x; M >= 256 0.32-0.77x ``onednn-int8``. Two-level layers
gain less than per-channel ones on the AMX path (a C-tile store and int32 multiply per group).
Hence its place in ``linear.KERNELS``: after ``onednn-int8`` (vLLM's prefill is faster there),
before ``cpu-int8``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

from w4a8_dint.formats import TWO_LEVEL
from w4a8_dint.kernels import ops as _ops  # noqa: F401  (registers torch.ops.w4a8_dint.*)
from w4a8_dint.kernels.base import AbsmaxReduce, W4A8LayerSpec, W4A8LinearKernel
from w4a8_dint.kernels.cpu_onednn import finish_scaled_acc

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "w4a8_cpu_packed.cpp"
CACHE_ROOT = Path.home() / ".cache" / "w4a8-dint" / "ext"
EXT_NAMESPACE = "w4a8_dint_cpu_packed"
ISA_PATHS = ("amx", "avx512_vnni", "avx2", "scalar")  # what W4A8_CPU_ISA accepts, newest first
TILE_ROWS, STEP_COLS = 16, 8  # the C++ layout: 16 output rows x 8 input columns per 64-byte block
_CFLAGS = ["-O3", "-fopenmp"]

# From this many rows on, decode to an int8 scratch and run one torch._int_mm (see the module docstring):
# the AMX loop keeps up with oneDNN much longer than the AVX512-VNNI one.
SCRATCH_MIN_M = {"amx": 512, "avx512_vnni": 128, "avx2": 128, "scalar": 128}


def scratch_min_m() -> int:
    """The M from which the op decodes to an int8 scratch, for the ISA path this process runs."""
    return SCRATCH_MIN_M[extension_ops().selected_isa()]


@functools.cache
def load_extension() -> tuple[bool, str | None]:
    """Build (once per source + torch version, cached on disk) and load the C++ ops; ``(ok, why not)``.

    The build directory is keyed by a hash of the source, the flags and the torch version, and built
    under a file lock, so parallel test processes neither race nor reuse a stale library.
    """
    try:
        from filelock import FileLock
        from torch.utils import cpp_extension

        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + torch.__version__.encode() + " ".join(_CFLAGS).encode()).hexdigest()[:16]
        build_dir = CACHE_ROOT / f"w4a8_cpu_packed_{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(build_dir) + ".lock"):
            cpp_extension.load(
                name=f"w4a8_cpu_packed_{key}", sources=[str(SOURCE)], build_directory=str(build_dir),
                extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - no compiler, failed build, ...: the other kernels run
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[-1])[:300]
        logger.warning("w4a8-dint: cpu-packed extension unavailable (%s: %s)", type(e).__name__, first)
        return False, f"the C++ extension did not build/load ({type(e).__name__}: {first})"
    return True, None


def extension_ops():
    """``torch.ops.w4a8_dint_cpu_packed`` (builds on first use); raises if it cannot build."""
    ok, why = load_extension()
    if not ok:
        raise RuntimeError(f"cpu-packed: {why}")
    return getattr(torch.ops, EXT_NAMESPACE)


def last_isa_path() -> str:
    """The ISA path the last packed GEMM in this process ran ("avx512_vnni", "avx2", "scalar"; "none")."""
    return extension_ops().last_isa()


def layout_weight(codes: torch.Tensor, group_mult: torch.Tensor | None, w8_row_sums: torch.Tensor,
                  pad_value: int) -> dict[str, torch.Tensor]:
    """Codes ``uint8 [N, K]`` (+ multipliers ``[N, ng]``) -> the C++ layout (see the .cpp header).

    ``w8_row_sums`` int64 ``[N]`` = sum_k w8; ``pad_value`` = w8 of code 0 (what padded columns decode to).
    """
    n, k = codes.shape
    nt, ks = -(-n // TILE_ROWS), -(-k // STEP_COLS)
    padded = torch.zeros(nt * TILE_ROWS, ks * STEP_COLS, dtype=torch.uint8)
    padded[:n, :k] = codes
    # [NT, 16 rows j, KS, nibble half, 4 cols i] -> [NT, KS, j, i, half]; byte 4j + i, low nibble = half 0.
    c = padded.reshape(nt, TILE_ROWS, ks, 2, 4).permute(0, 2, 1, 4, 3)
    tiles = (c[..., 0] | (c[..., 1] << 4)).reshape(nt, ks, 64).contiguous()
    comp = torch.zeros(nt * TILE_ROWS, dtype=torch.int64)
    comp[:n] = 128 * (w8_row_sums + (ks * STEP_COLS - k) * pad_value)  # VNNI feeds x + 128 (pads: x = 0)
    state = {"tiles": tiles, "comp": comp.to(torch.int32)}
    if group_mult is not None:
        mult = torch.zeros(nt * TILE_ROWS, group_mult.shape[1], dtype=torch.uint8)
        mult[:n] = group_mult
        state["mult"] = mult.reshape(nt, TILE_ROWS, -1).permute(0, 2, 1).contiguous()
    return state


def resident_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes the prepared state keeps (everything the kernel holds per layer)."""
    return sum(t.numel() * t.element_size() for t in state.values())


class CpuPackedKernel(W4A8LinearKernel):
    """CPU, weights resident as 4-bit codes: in-register table decode + exact integer dot products.

    See the module docstring for the layout, the exactness argument and the M buckets.
    """

    name = "cpu-packed"
    supports_absmax_reduce = True  # quantize_input applies the reduce

    @classmethod
    def can_implement(cls, spec, device):
        if torch.device(device).type != "cpu":
            return False, f"runs on CPU tensors only (got {device})"
        if spec.epilogue_groups != 1:
            return False, ("float group scales need a float scale per group inside the reduction (not one "
                           "integer GEMM); per-channel and two-level scales only")
        if spec.two_level and spec.group_size % STEP_COLS:
            return False, f"two-level group size {spec.group_size} is not a multiple of {STEP_COLS}"
        ok, why = load_extension()
        return (True, None) if ok else (False, why)

    def prepare(self, qweight, weight_scale, weight_group_mult=None):
        qw = self.quantized_weight(qweight, weight_scale, weight_group_mult)
        from w4a8_dint.formats import unpack_codes

        w8, half_scales = qw.int8_expansion()  # transient: only its row sums and max are kept
        lut = self.spec.table.expansion_lut()
        pad = int(lut[0])  # per channel only (two-level K is a multiple of 8): m = 1 for padded columns
        state = layout_weight(unpack_codes(qw.packed.cpu()), qw.group_mult, w8.sum(1, dtype=torch.int64), pad)
        state["lut"] = lut
        state["half_scales"] = half_scales.reshape(-1).float().contiguous()  # [N]
        return state

    def apply(self, state, x, input_scale=None, smooth_scale=None, bias=None, absmax_reduce: AbsmaxReduce | None = None):
        shape = x.shape
        q_x, s_x = self.quantize_input(x.reshape(-1, shape[-1]), input_scale, smooth_scale, absmax_reduce)
        y = torch.ops.w4a8_dint.cpu_packed_gemm(
            q_x, state["tiles"], state.get("mult"), state["comp"], state["lut"], state["half_scales"],
        )
        return finish_scaled_acc(y, s_x, bias, shape, x.dtype)
