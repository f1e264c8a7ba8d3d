// 4-bit-resident CPU W4A8 GEMM: exact int32 acc[m, n] = sum_k xq[m, k] * w8[n, k], w8 = 2v * m,
// computed from the packed nibbles without ever writing w8 to memory.
//
// Weight layout (built at prepare time by kernels/cpu_packed.py, still 4 bits per weight):
//   tiles  uint8 [NT, KS, 64]: NT = ceil(N / 16) tiles of 16 output rows, KS = ceil(K / 8) steps of 8
//          columns. Byte b = 4 * j + i of a step holds, for row n0 + j, column k0 + i in its low
//          nibble and column k0 + 4 + i in its high nibble. One 64-byte load therefore decodes (one
//          byte shuffle through the 16-entry table per nibble half) into exactly the two 16 x 4 int8
//          operands of two AVX512-VNNI dot products. Padded rows/columns hold code 0; padded
//          activation columns are 0, so they add nothing.
//   mult   uint8 [NT, NG, 16]: two-level group multipliers (one byte per row and group; empty for
//          per-channel weights, where m = 1). Applied exactly in int32 once per group:
//          sum_g m_g * sum_{k in g} x * 2v == sum_k x * (2v * m).
//   comp   int32 [NT * 16]: 128 * sum_k w8[n, k] (VNNI multiplies unsigned bytes, so activations go
//          in as x + 128 and this is subtracted; int32 wraparound makes it exact whenever the true
//          result fits int32, as the reference's own int32 accumulator requires anyway).
//
// ISA paths (runtime dispatch, capped by env W4A8_CPU_ISA in {amx, avx512_vnni, avx2, scalar}):
//   amx          decoded steps are the rows of an int8 B tile; tdpbssd (s8 x s8 -> int32, exact)
//   avx512_vnni  vpshufb decode + vpdpbusd (u8 x s8 -> int32, no intermediate saturation)
//   avx2         vpshufb decode, sign-extend to int16 (times m in int16), vpmaddwd: exact. Never
//                vpmaddubsw: its int16 pair sums saturate for |w| > 64 (the bug reference.py documents).
//   scalar       plain C++.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kRows = 16;        // output rows per tile
constexpr int kCols = 8;         // input columns per step
constexpr int kStepBytes = 64;   // packed bytes per (tile, step)

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512_vnni", "amx"};
constexpr int kNumIsas = 4;

// Linux hands out the AMX tile state only on request (once per process).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kAmx:
      return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && cpu_has(kAvx512Vnni) &&
             amx_permitted();
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case kAvx2:
      return __builtin_cpu_supports("avx2");
    default:
      return true;
  }
}

Isa selected_isa() {
  static const Isa isa = [] {
    Isa cap = kAmx;
    if (const char* env = std::getenv("W4A8_CPU_ISA")) {
      std::string s(env);
      if (s == "scalar") cap = kScalar;
      else if (s == "avx2") cap = kAvx2;
      else if (s == "avx512_vnni") cap = kAvx512Vnni;
      else if (s == "amx" || s.empty()) cap = kAmx;
      else TORCH_CHECK(false, "W4A8_CPU_ISA must be one of amx, avx512_vnni, avx2, scalar; got '", s, "'");
    }
    for (int i = cap; i > kScalar; --i)
      if (cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
    return kScalar;
  }();
  return isa;
}

std::atomic<int64_t> g_last_isa{-1};

struct Problem {
  const uint8_t* tiles;
  const uint8_t* mult;   // nullptr: per channel
  const int32_t* comp;
  const int8_t* lut;
  const float* half_scales;  // nullptr: write the int32 accumulator
  int64_t m, n, k, ksteps, ngroups, gsteps;
};

// Writes the finished 16-wide row block: acc (int32) or fl(float(acc) * half_scale), tail rows cut.
inline void store_row(const Problem& p, void* out, int64_t row, int64_t n0, const int32_t* acc16) {
  const int64_t cnt = std::min<int64_t>(kRows, p.n - n0);
  if (p.half_scales) {
    float* o = static_cast<float*>(out) + row * p.n + n0;
    for (int64_t j = 0; j < cnt; ++j) o[j] = static_cast<float>(acc16[j]) * p.half_scales[n0 + j];
  } else {
    int32_t* o = static_cast<int32_t*>(out) + row * p.n + n0;
    std::memcpy(o, acc16, cnt * sizeof(int32_t));
  }
}

// ---------------------------------------------------------------- scalar
void tile_scalar(const Problem& p, int64_t t, const int8_t* x, int64_t r0, int64_t rows, void* out) {
  const uint8_t* tile = p.tiles + t * p.ksteps * kStepBytes;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const int8_t* xr = x + r * p.ksteps * kCols;
    int32_t acc[kRows] = {0};
    for (int64_t g = 0; g < p.ngroups; ++g) {
      int32_t gacc[kRows] = {0};
      for (int64_t s = g * p.gsteps; s < (g + 1) * p.gsteps; ++s) {
        const uint8_t* blk = tile + s * kStepBytes;
        const int8_t* xs = xr + s * kCols;
        for (int j = 0; j < kRows; ++j)
          for (int i = 0; i < 4; ++i) {
            const uint8_t b = blk[4 * j + i];
            gacc[j] += int32_t(xs[i]) * p.lut[b & 0xF] + int32_t(xs[4 + i]) * p.lut[b >> 4];
          }
      }
      const uint8_t* mg = p.mult ? p.mult + (t * p.ngroups + g) * kRows : nullptr;
      for (int j = 0; j < kRows; ++j) acc[j] += mg ? gacc[j] * int32_t(mg[j]) : gacc[j];
    }
    store_row(p, out, r, t * kRows, acc);
  }
}

// ---------------------------------------------------------------- AVX2 (no VNNI)
// One half tile (8 rows) at a time; rows of x as int16, weights sign-extended to int16 (times m),
// vpmaddwd (int16 x int16 pair sums into int32: exact for these ranges).
template <int RB>
__attribute__((target("avx2"))) void half_tile_avx2(const Problem& p, int64_t t, int half, const int16_t* x16,
                                                     int64_t r0, void* out, int32_t* acc_out /*[RB][8]*/) {
  const uint8_t* tile = p.tiles + t * p.ksteps * kStepBytes + half * 32;
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.lut)));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t ldx = p.ksteps * kCols;
  __m256i acc0[RB], acc1[RB];  // rows 0-3 / 4-7 of the half tile, two int32 lanes per row
  for (int r = 0; r < RB; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  __m256i m0 = _mm256_set1_epi16(1), m1 = m0;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    if (p.mult) {
      const __m128i mg = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.mult + (t * p.ngroups + g) * kRows + half * 8));
      m0 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(mg, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)));
      m1 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(mg, _mm_setr_epi8(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)));
    }
    for (int64_t s = g * p.gsteps; s < (g + 1) * p.gsteps; ++s) {
      const __m256i pk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + s * kStepBytes));
      const __m256i wl8 = _mm256_shuffle_epi8(table, _mm256_and_si256(pk, nib));
      const __m256i wh8 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(pk, 4), nib));
      __m256i wl0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(wl8));
      __m256i wl1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(wl8, 1));
      __m256i wh0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(wh8));
      __m256i wh1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(wh8, 1));
      if (p.mult) {
        wl0 = _mm256_mullo_epi16(wl0, m0); wh0 = _mm256_mullo_epi16(wh0, m0);
        wl1 = _mm256_mullo_epi16(wl1, m1); wh1 = _mm256_mullo_epi16(wh1, m1);
      }
      for (int r = 0; r < RB; ++r) {
        const int16_t* xs = x16 + (r0 + r) * ldx + s * kCols;
        int64_t lo, hi;
        std::memcpy(&lo, xs, 8);
        std::memcpy(&hi, xs + 4, 8);
        const __m256i xl = _mm256_set1_epi64x(lo), xh = _mm256_set1_epi64x(hi);
        acc0[r] = _mm256_add_epi32(acc0[r], _mm256_add_epi32(_mm256_madd_epi16(wl0, xl), _mm256_madd_epi16(wh0, xh)));
        acc1[r] = _mm256_add_epi32(acc1[r], _mm256_add_epi32(_mm256_madd_epi16(wl1, xl), _mm256_madd_epi16(wh1, xh)));
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    // acc0 lanes: [n0 n0 n1 n1 | n2 n2 n3 n3], acc1 the same for n4..n7 -> [n0..n7].
    const __m256i h = _mm256_hadd_epi32(acc0[r], acc1[r]);  // [n0 n1 n4 n5 | n2 n3 n6 n7]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + r * 8), _mm256_permute4x64_epi64(h, 0xD8));
  }
}

template <int RB>
void tile_avx2_rows(const Problem& p, int64_t t, const int16_t* x16, int64_t r0, void* out) {
  int32_t acc[RB][kRows];
  int32_t tmp[RB * 8];
  for (int half = 0; half < 2; ++half) {
    half_tile_avx2<RB>(p, t, half, x16, r0, out, tmp);
    for (int r = 0; r < RB; ++r) std::memcpy(&acc[r][half * 8], tmp + r * 8, 8 * sizeof(int32_t));
  }
  for (int r = 0; r < RB; ++r) store_row(p, out, r0 + r, t * kRows, acc[r]);
}

void tile_avx2(const Problem& p, int64_t t, const int16_t* x16, int64_t r0, int64_t rows, void* out) {
  for (int64_t r = r0; r < r0 + rows;) {
    const int64_t left = r0 + rows - r;
    if (left >= 4) { tile_avx2_rows<4>(p, t, x16, r, out); r += 4; }
    else if (left == 3) { tile_avx2_rows<3>(p, t, x16, r, out); r += 3; }
    else if (left == 2) { tile_avx2_rows<2>(p, t, x16, r, out); r += 2; }
    else { tile_avx2_rows<1>(p, t, x16, r, out); r += 1; }
  }
}

// ---------------------------------------------------------------- AVX512-VNNI
// One 64-byte step: decode both nibble halves through the table, one vpdpbusd per row and half
// (low half into accumulator set LO, high half into HI).
template <int RB, int C, int LO, int HI>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void vnni_step(
    const uint8_t* blk, const uint8_t* const* xr, int64_t col, __m512i table, __m512i nib, __m512i (&gacc)[C][RB]) {
  const __m512i pk = _mm512_loadu_si512(blk);
  const __m512i wl = _mm512_shuffle_epi8(table, _mm512_and_si512(pk, nib));
  const __m512i wh = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(pk, 4), nib));
  for (int r = 0; r < RB; ++r) {
    int32_t lo, hi;
    std::memcpy(&lo, xr[r] + col, 4);
    std::memcpy(&hi, xr[r] + col + 4, 4);
    gacc[LO][r] = _mm512_dpbusd_epi32(gacc[LO][r], _mm512_set1_epi32(lo), wl);
    gacc[HI][r] = _mm512_dpbusd_epi32(gacc[HI][r], _mm512_set1_epi32(hi), wh);
  }
}

template <int RB, bool kTwoLevel>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni_rows(const Problem& p, int64_t t,
                                                                          const uint8_t* xu, int64_t r0, void* out) {
  const uint8_t* tile = p.tiles + t * p.ksteps * kStepBytes;
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.lut)));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t ldx = p.ksteps * kCols;
  const uint8_t* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = xu + (r0 + r) * ldx;
  __m512i acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_si512();
  // Few rows: separate accumulators for the two nibble halves, so consecutive vpdpbusd do not wait on
  // each other's latency; more rows are independent chains already. (A third/fourth chain for 1-2 rows
  // measured no faster: the loop is then bound by the byte shuffles and memory.)
  constexpr int kChains = RB <= 4 ? 2 : 1;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    __m512i gacc[kChains][RB];
    for (int c = 0; c < kChains; ++c)
      for (int r = 0; r < RB; ++r) gacc[c][r] = _mm512_setzero_si512();
    for (int64_t s = g * p.gsteps; s < (g + 1) * p.gsteps; ++s)
      vnni_step<RB, kChains, 0, kChains - 1>(tile + s * kStepBytes, xr, s * kCols, table, nib, gacc);
    for (int c = 1; c < kChains; ++c)
      for (int r = 0; r < RB; ++r) gacc[0][r] = _mm512_add_epi32(gacc[0][r], gacc[c][r]);
    if (kTwoLevel) {
      const __m512i mv = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.mult + (t * p.ngroups + g) * kRows)));
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_add_epi32(acc[r], _mm512_mullo_epi32(gacc[0][r], mv));
    } else {
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_add_epi32(acc[r], gacc[0][r]);
    }
  }
  const __m512i comp = _mm512_loadu_si512(p.comp + t * kRows);
  alignas(64) int32_t res[kRows];
  for (int r = 0; r < RB; ++r) {
    _mm512_store_si512(res, _mm512_sub_epi32(acc[r], comp));
    store_row(p, out, r0 + r, t * kRows, res);
  }
}

template <bool kTwoLevel>
void tile_vnni(const Problem& p, int64_t t, const uint8_t* xu, int64_t r0, int64_t rows, void* out) {
  for (int64_t r = r0; r < r0 + rows;) {
    switch (std::min<int64_t>(8, r0 + rows - r)) {
      case 8: tile_vnni_rows<8, kTwoLevel>(p, t, xu, r, out); r += 8; break;
      case 7: tile_vnni_rows<7, kTwoLevel>(p, t, xu, r, out); r += 7; break;
      case 6: tile_vnni_rows<6, kTwoLevel>(p, t, xu, r, out); r += 6; break;
      case 5: tile_vnni_rows<5, kTwoLevel>(p, t, xu, r, out); r += 5; break;
      case 4: tile_vnni_rows<4, kTwoLevel>(p, t, xu, r, out); r += 4; break;
      case 3: tile_vnni_rows<3, kTwoLevel>(p, t, xu, r, out); r += 3; break;
      case 2: tile_vnni_rows<2, kTwoLevel>(p, t, xu, r, out); r += 2; break;
      default: tile_vnni_rows<1, kTwoLevel>(p, t, xu, r, out); r += 1; break;
    }
  }
}


// ---------------------------------------------------------------- AMX (int8 tiles)
// The 64-byte steps decode straight into AMX B-tile rows: step s gives the 16 x 4 operands of column
// quads 2s (low nibbles) and 2s + 1 (high nibbles), i.e. B rows in the layout tdpbssd wants. One
// decoded B tile (64 columns: 8 steps) serves up to 4 C tiles of 16 activation rows (s8 x s8, no +128).
// Two-level multipliers are applied in int32 per group (C tiles zeroed per group). All 8 tiles are
// 16 x 64 bytes; activations are padded with zero rows/columns to fit.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

constexpr int kAmxRows = 16, kAmxBlocks = 3;  // rows per C tile; C tiles per pass (0-2; A 3-5; B 7)

__attribute__((target("avx512f,avx512bw"))) void decode_b_tile(const uint8_t* steps, int64_t nsteps,
                                                               const __m512i table, int8_t* b /*[16][64]*/) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t s = 0; s < 8; ++s) {
    __m512i wl = _mm512_setzero_si512(), wh = wl;  // past the chunk: zero rows
    if (s < nsteps) {
      const __m512i pk = _mm512_loadu_si512(steps + s * kStepBytes);
      wl = _mm512_shuffle_epi8(table, _mm512_and_si512(pk, nib));
      wh = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(pk, 4), nib));
    }
    _mm512_store_si512(b + (2 * s) * 64, wl);
    _mm512_store_si512(b + (2 * s + 1) * 64, wh);
  }
}

__attribute__((target("amx-tile"))) void amx_configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  // Not _tile_loadconfig: GCC 12's macro gives the asm an 8-byte memory operand, so the compiler drops
  // the stores to the rest of the 64-byte configuration (found as a #GP on ldtilecfg).
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// Rows [r0, r0 + rows) of x (int8 [Mpad, ldx], zero padded), output tile t; rows <= 48.
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw"))) void tile_amx(const Problem& p, int64_t t,
                                                                            const int8_t* x, int64_t ldx,
                                                                            int64_t r0, int64_t rows, void* out) {
  const uint8_t* tile = p.tiles + t * p.ksteps * kStepBytes;
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.lut)));
  const int nblk = static_cast<int>((rows + kAmxRows - 1) / kAmxRows);
  alignas(64) int8_t bbuf[16 * 64];
  alignas(64) int32_t cbuf[kAmxRows * 16];
  alignas(64) int32_t acc[kAmxBlocks * kAmxRows][16];
  std::memset(acc, 0, sizeof(acc));
  const int64_t chunk = std::min<int64_t>(8, p.gsteps);  // steps per B tile (8: 64 columns)
  const int8_t* xa0 = x + r0 * ldx;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    _tile_zero(0);
    if (nblk > 1) _tile_zero(1);
    if (nblk > 2) _tile_zero(2);
    for (int64_t s = g * p.gsteps; s < (g + 1) * p.gsteps; s += chunk) {
      decode_b_tile(tile + s * kStepBytes, std::min<int64_t>(chunk, (g + 1) * p.gsteps - s), table, bbuf);
      const int8_t* xa = xa0 + s * kCols;
      _tile_loadd(7, bbuf, 64);
      _tile_loadd(3, xa, ldx);
      _tile_dpbssd(0, 3, 7);
      if (nblk > 1) { _tile_loadd(4, xa + 16 * ldx, ldx); _tile_dpbssd(1, 4, 7); }
      if (nblk > 2) { _tile_loadd(5, xa + 32 * ldx, ldx); _tile_dpbssd(2, 5, 7); }
    }
    const uint8_t* mg = p.mult ? p.mult + (t * p.ngroups + g) * kRows : nullptr;
    const __m512i mv = mg ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mg)))
                          : _mm512_set1_epi32(1);
    for (int b = 0; b < nblk; ++b) {
      if (b == 0) _tile_stored(0, cbuf, 64);
      else if (b == 1) _tile_stored(1, cbuf, 64);
      else _tile_stored(2, cbuf, 64);
      const int rb = static_cast<int>(std::min<int64_t>(kAmxRows, rows - b * kAmxRows));
      for (int r = 0; r < rb; ++r) {
        __m512i* a = reinterpret_cast<__m512i*>(acc[b * kAmxRows + r]);
        *a = _mm512_add_epi32(*a, _mm512_mullo_epi32(_mm512_load_si512(cbuf + r * 16), mv));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) store_row(p, out, r0 + r, t * kRows, acc[r]);
}

// ---------------------------------------------------------------- ops
void check_weight(const at::Tensor& tiles, const c10::optional<at::Tensor>& mult, const at::Tensor& comp,
                  const at::Tensor& lut, int64_t n, int64_t k) {
  TORCH_CHECK(tiles.device().is_cpu() && tiles.scalar_type() == at::kByte && tiles.dim() == 3 &&
                  tiles.size(2) == kStepBytes && tiles.is_contiguous(),
              "tiles must be contiguous uint8 [N/16, K/8, 64] on CPU");
  TORCH_CHECK(tiles.size(0) == (n + kRows - 1) / kRows && tiles.size(1) == (k + kCols - 1) / kCols,
              "tiles shape ", tiles.sizes(), " does not hold N=", n, " K=", k);
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == tiles.size(0) * kRows,
              "comp must be contiguous int32 [ceil(N/16)*16]");
  TORCH_CHECK(lut.scalar_type() == at::kChar && lut.numel() == 16 && lut.is_contiguous(), "lut must be int8 [16]");
  if (mult.has_value()) {
    TORCH_CHECK(mult->scalar_type() == at::kByte && mult->dim() == 3 && mult->size(0) == tiles.size(0) &&
                    mult->size(2) == kRows && mult->is_contiguous() && mult->size(1) > 0 &&
                    tiles.size(1) % mult->size(1) == 0,
                "mult must be contiguous uint8 [N/16, groups, 16] with groups dividing K/8");
  }
}

// q_x int8 [M, K] -> int32 [M, N] (half_scales None) or float32 fl(acc * half_scales[n]) [M, N].
at::Tensor packed_gemm(const at::Tensor& q_x, const at::Tensor& tiles, const c10::optional<at::Tensor>& mult,
                       const at::Tensor& comp, const at::Tensor& lut, const c10::optional<at::Tensor>& half_scales,
                       int64_t n) {
  TORCH_CHECK(q_x.device().is_cpu() && q_x.scalar_type() == at::kChar && q_x.dim() == 2, "q_x must be int8 [M, K] on CPU");
  const int64_t m = q_x.size(0), k = q_x.size(1);
  check_weight(tiles, mult, comp, lut, n, k);
  if (half_scales.has_value())
    TORCH_CHECK(half_scales->scalar_type() == at::kFloat && half_scales->numel() == n && half_scales->is_contiguous(),
                "half_scales must be contiguous float32 [N]");
  at::Tensor out = at::empty({m, n}, q_x.options().dtype(half_scales.has_value() ? at::kFloat : at::kInt));
  if (m == 0 || n == 0) return out;

  Problem p{};
  p.tiles = tiles.data_ptr<uint8_t>();
  p.mult = mult.has_value() ? mult->data_ptr<uint8_t>() : nullptr;
  p.comp = comp.data_ptr<int32_t>();
  p.lut = lut.data_ptr<int8_t>();
  p.half_scales = half_scales.has_value() ? half_scales->data_ptr<float>() : nullptr;
  p.m = m; p.n = n; p.k = k;
  p.ksteps = tiles.size(1);
  p.ngroups = mult.has_value() ? mult->size(1) : 1;
  p.gsteps = p.ksteps / p.ngroups;
  const int64_t kp = p.ksteps * kCols;
  const int64_t nt = tiles.size(0);
  void* o = out.data_ptr();
  const Isa isa = selected_isa();

  // Activations padded to K' = 8 * KS with zeros, in the form each path multiplies.
  const at::Tensor xc = q_x.contiguous();
  const int8_t* xs = xc.data_ptr<int8_t>();
  std::vector<uint8_t> xu;   // VNNI: x + 128 as u8 (pads 128, i.e. x = 0)
  std::vector<int16_t> x16;  // AVX2: sign-extended
  std::vector<int8_t> x8;    // scalar; AMX (padded to 64 columns)
  // AMX: a B tile may span 64 columns past a group's start, an A tile 16 rows: pad both with zeros.
  const int64_t ldx_amx = kp + 64, m_amx = (m + 15) / 16 * 16;
  if (isa == kAmx) {
    x8.assign(m_amx * ldx_amx, 0);
    for (int64_t r = 0; r < m; ++r) std::memcpy(&x8[r * ldx_amx], xs + r * k, k);
  } else if (isa == kAvx512Vnni) {
    xu.assign(m * kp, 128);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < k; ++c) xu[r * kp + c] = static_cast<uint8_t>(xs[r * k + c] ^ 0x80);
  } else if (isa == kAvx2) {
    x16.assign(m * kp, 0);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < k; ++c) x16[r * kp + c] = xs[r * k + c];
  } else {
    x8.assign(m * kp, 0);
    for (int64_t r = 0; r < m; ++r) std::memcpy(&x8[r * kp], xs + r * k, k);
  }

  // Parallel over tiles; at least ~128 KiB of packed weight per task.
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, p.ksteps * kStepBytes));
  at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    if (isa == kAmx) amx_configure();  // tile configuration is per thread
    for (int64_t t = t0; t < t1; ++t) {
      if (isa == kAmx) {
        for (int64_t r = 0; r < m; r += kAmxBlocks * kAmxRows)
          tile_amx(p, t, x8.data(), ldx_amx, r, std::min<int64_t>(kAmxBlocks * kAmxRows, m - r), o);
      } else if (isa == kAvx512Vnni) {
        if (p.mult) tile_vnni<true>(p, t, xu.data(), 0, m, o);
        else tile_vnni<false>(p, t, xu.data(), 0, m, o);
      } else if (isa == kAvx2) {
        tile_avx2(p, t, x16.data(), 0, m, o);
      } else {
        tile_scalar(p, t, x8.data(), 0, m, o);
      }
    }
    if (isa == kAmx) amx_release();
  });
  g_last_isa.store(isa);
  return out;
}

// int8 w (64 lanes) times int16 multipliers (lanes 0-31 / 32-63); exact: |2v * m| <= 127.
__attribute__((target("avx512f,avx512bw"))) inline __m512i times_mult_avx512(__m512i w, __m512i m_lo, __m512i m_hi) {
  const __m512i lo = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(_mm512_castsi512_si256(w)), m_lo);
  const __m512i hi = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(w, 1)), m_hi);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(lo)), _mm512_cvtepi16_epi8(hi), 1);
}

// AVX512 decode of one tile into rows n0.. of the row-major int8 [N, K] scratch: per 64-byte step the
// two 16 x 4 operands, times m (int16, exact), interleaved so each row gets its 8 columns as one qword.
__attribute__((target("avx512f,avx512bw"))) void decode_tile_avx512(const uint8_t* tile, const uint8_t* mult,
                                                                    const int8_t* lut, int64_t ksteps, int64_t gsteps,
                                                                    int64_t rows, int64_t k, int8_t* out) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // qword q of unpacklo(wl, wh) holds row 4 * (q / 2) + q % 2; of unpackhi, that row + 2.
  constexpr int64_t kChunkSteps = 64, kChunkStride = kChunkSteps * kCols + 64;
  alignas(64) int8_t buf[kRows * kChunkStride];
  __m512i m_lo = _mm512_set1_epi16(1), m_hi = m_lo;
  for (int64_t s = 0; s < ksteps; ++s) {
    if (mult && s % gsteps == 0) {
      // 16 multipliers -> 64 bytes, each repeated for its row's 4 bytes, widened to int16.
      alignas(64) uint8_t rep[64];
      const uint8_t* mg = mult + (s / gsteps) * kRows;
      for (int b = 0; b < 64; ++b) rep[b] = mg[b / 4];
      const __m512i r8 = _mm512_load_si512(rep);
      m_lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(r8));
      m_hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(r8, 1));
    }
    const __m512i pk = _mm512_loadu_si512(tile + s * kStepBytes);
    __m512i wl = _mm512_shuffle_epi8(table, _mm512_and_si512(pk, nib));
    __m512i wh = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(pk, 4), nib));
    if (mult) {
      wl = times_mult_avx512(wl, m_lo, m_hi);
      wh = times_mult_avx512(wh, m_lo, m_hi);
    }
    const __m512i u_lo = _mm512_unpacklo_epi32(wl, wh), u_hi = _mm512_unpackhi_epi32(wl, wh);
    // Rows of a K = 4096 weight are 4 KiB apart: 16 row streams alias the same L1 sets. Decode a chunk
    // into a small buffer with a padded row stride, then copy whole row segments out.
    const int64_t sc = s % kChunkSteps;
    alignas(64) int64_t q_lo[8], q_hi[8];
    _mm512_store_si512(q_lo, u_lo);
    _mm512_store_si512(q_hi, u_hi);
    for (int q = 0; q < 8; ++q) {
      const int r_lo = 4 * (q / 2) + q % 2;
      std::memcpy(buf + r_lo * kChunkStride + sc * kCols, &q_lo[q], 8);
      std::memcpy(buf + (r_lo + 2) * kChunkStride + sc * kCols, &q_hi[q], 8);
    }
    if (sc == kChunkSteps - 1 || s == ksteps - 1) {
      const int64_t c0 = (s - sc) * kCols, cols = std::min<int64_t>((sc + 1) * kCols, k - c0);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * k + c0, buf + r * kChunkStride, cols);
    }
  }
}

// The int8 expansion w8 = 2v * m as int8 [N, K] (a per-call scratch for the large-M path).
// Into `out` (int8 [N, K], contiguous), so a caller can reuse one scratch buffer across calls.
void decode_int8_into(at::Tensor& out, const at::Tensor& tiles, const c10::optional<at::Tensor>& mult,
                      const at::Tensor& comp, const at::Tensor& lut, int64_t n, int64_t k) {
  check_weight(tiles, mult, comp, lut, n, k);
  TORCH_CHECK(out.scalar_type() == at::kChar && out.is_contiguous() && out.dim() == 2 && out.size(0) == n &&
                  out.size(1) == k, "out must be contiguous int8 [N, K]");
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const uint8_t* mp = mult.has_value() ? mult->data_ptr<uint8_t>() : nullptr;
  const int8_t* lp = lut.data_ptr<int8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  const int64_t ks = tiles.size(1), ng = mult.has_value() ? mult->size(1) : 1, gs = ks / ng;
  const bool simd = selected_isa() == kAvx512Vnni;
  at::parallel_for(0, tiles.size(0), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rows = std::min<int64_t>(kRows, n - t * kRows);
      if (simd) {
        decode_tile_avx512(tp + t * ks * kStepBytes, mp ? mp + t * ng * kRows : nullptr, lp, ks, gs, rows, k,
                           op + t * kRows * k);
        continue;
      }
      for (int64_t s = 0; s < ks; ++s) {
        const uint8_t* blk = tp + (t * ks + s) * kStepBytes;
        const uint8_t* mg = mp ? mp + (t * ng + s / gs) * kRows : nullptr;
        const int64_t c0 = s * kCols, cols = std::min<int64_t>(kCols, k - c0);
        for (int64_t j = 0; j < rows; ++j) {
          int8_t v[kCols];
          const int32_t mj = mg ? mg[j] : 1;
          for (int i = 0; i < 4; ++i) {
            v[i] = static_cast<int8_t>(lp[blk[4 * j + i] & 0xF] * mj);
            v[4 + i] = static_cast<int8_t>(lp[blk[4 * j + i] >> 4] * mj);
          }
          std::memcpy(op + (t * kRows + j) * k + c0, v, cols);
        }
      }
    }
  });
}

at::Tensor decode_int8(const at::Tensor& tiles, const c10::optional<at::Tensor>& mult, const at::Tensor& comp,
                       const at::Tensor& lut, int64_t n, int64_t k) {
  at::Tensor out = at::empty({n, k}, tiles.options().dtype(at::kChar));
  decode_int8_into(out, tiles, mult, comp, lut, n, k);
  return out;
}

std::string last_isa() {
  const int64_t i = g_last_isa.load();
  return i < 0 ? std::string("none") : std::string(kIsaNames[i]);
}
std::string selected_isa_name() { return kIsaNames[selected_isa()]; }
bool cpu_supports(const std::string& name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (name == kIsaNames[i]) return cpu_has(static_cast<Isa>(i));
  TORCH_CHECK(false, "unknown ISA path '", name, "'");
}

}  // namespace

TORCH_LIBRARY(w4a8_dint_cpu_packed, m) {
  m.def("packed_gemm(Tensor q_x, Tensor tiles, Tensor? mult, Tensor comp, Tensor lut, Tensor? half_scales, int n) -> Tensor");
  m.def("decode_int8(Tensor tiles, Tensor? mult, Tensor comp, Tensor lut, int n, int k) -> Tensor");
  m.def("decode_int8_into(Tensor(a!) out, Tensor tiles, Tensor? mult, Tensor comp, Tensor lut, int n, int k) -> ()");
  m.def("last_isa() -> str", TORCH_FN(last_isa));
  m.def("selected_isa() -> str", TORCH_FN(selected_isa_name));
  m.def("cpu_supports(str isa) -> bool", TORCH_FN(cpu_supports));
  m.impl("packed_gemm", c10::DispatchKey::CPU, TORCH_FN(packed_gemm));
  m.impl("decode_int8", c10::DispatchKey::CPU, TORCH_FN(decode_int8));
  m.impl("decode_int8_into", c10::DispatchKey::CPU, TORCH_FN(decode_int8_into));
}
