// Sparse matrix times a few vectors for decoding on a CPU: y[b, r] = sum_c W[r, c] x[b, c], W stored as
// mixsparse's compressed "bitmask" encoding (one bit per weight, first weight in the most significant bit of
// each byte, rows byte-aligned; the non-zero values, fp16, bf16 or fp32, row-major) with per-row offsets into the
// values computed at load. Written by hand because no maintained library multiplies this format (DeepSparse,
// torchao's sparsity, vLLM's and compressed-tensors' sparse paths are gone): torch's sparse CSR matmul needs an
// int64 column index per non-zero (4x the fp16 values' bytes), which undoes the memory saving.
//
// AVX2: each mask byte's 8 columns get their stored values by one byte shuffle from a 256-entry table (fp16:
// then converted; bf16: shuffled straight into float32 lanes), four bytes per step with their offsets from
// popcounts of one word, so the loop carries one add and four FMA chains. AVX-512 (with VBMI2 and GFNI): 32
// columns per step, one expansion (vpexpandw) of the stored 16-bit values into their lanes. Both accumulate in
// float32, one set of accumulators per input vector. The ISA is chosen at run time (the loader
// times both); one translation unit, per-function target attributes, so the build needs no -m flags.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#define MS_X86 1
#else
#define MS_X86 0
#endif

namespace {

struct Tables {
  // indexed by the file's byte as it is (most significant bit = first column = lane 0), so no bit reversal
  uint8_t pop[256];                  // set bits
  alignas(16) uint8_t sh16[256][16]; // pshufb: the byte's stored 16-bit values into their lanes, 0 elsewhere
  alignas(32) uint8_t shbf[256][32]; // vpshufb on two copies of 8 stored bf16: float32 lanes (low half 0)
  alignas(32) uint8_t sh8top[256][32];  // vpshufb on two copies of 8 stored 8-bit codes: each into the top byte
                                       // of its 32-bit lane (0 elsewhere)
  alignas(32) int32_t expand[256][8];   // lane -> index of its value among the stored ones (prefix count)
  alignas(32) int32_t lane_on[256][8];  // -1 where the lane's weight is stored, 0 elsewhere
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool on = (m >> (7 - i)) & 1;
        expand[m][i] = on ? k : 0;
        lane_on[m][i] = on ? -1 : 0;
        sh8top[m][4 * i] = sh8top[m][4 * i + 1] = sh8top[m][4 * i + 2] = 0x80;
        sh8top[m][4 * i + 3] = on ? static_cast<uint8_t>(k) : 0x80;
        sh16[m][2 * i] = on ? static_cast<uint8_t>(2 * k) : 0x80;
        sh16[m][2 * i + 1] = on ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        shbf[m][4 * i] = shbf[m][4 * i + 1] = 0x80;
        shbf[m][4 * i + 2] = on ? static_cast<uint8_t>(2 * k) : 0x80;
        shbf[m][4 * i + 3] = on ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += on;
      }
      pop[m] = static_cast<uint8_t>(k);
    }
  }
};
const Tables T;

template <typename V>
inline float to_float(V v);
template <>
inline float to_float<at::Half>(at::Half v) { return static_cast<float>(v); }
template <>
inline float to_float<at::BFloat16>(at::BFloat16 v) { return static_cast<float>(v); }
template <>
inline float to_float<float>(float v) { return v; }

// the reference: also the path for CPUs without AVX2
template <typename V>
void rows_scalar(const float* x, int64_t B, int64_t K, const uint8_t* mask, const V* vals, const int64_t* row_ptr,
                 float* y, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t off = row_ptr[r];
    for (int64_t b = 0; b < B; ++b) y[b * N + r] = 0.f;
    for (int64_t c8 = 0; c8 < K / 8; ++c8) {
      uint8_t bits = m[c8];
      for (int i = 0; i < 8 && bits; ++i) {
        if (bits & (0x80 >> i)) {
          float w = to_float<V>(vals[off++]);
          for (int64_t b = 0; b < B; ++b) y[b * N + r] += w * x[b * K + c8 * 8 + i];
        }
      }
    }
  }
}

#if MS_X86
__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
// the sum of a row's accumulators
template <int NA>
__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(const __m256 (&acc)[NA]) {
  __m256 s = acc[0];
  for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[a]);
  return hsum_avx2(s);
}
#endif

// ``R`` elements readable from p + o: p + o itself, or (``Safe``, within R of the buffer's n elements) a
// zero-padded copy in tmp. The kernels read a whole step's values at once; only a layer's last rows need this.
template <int R, bool Safe, typename V>
inline const V* readable(const V* p, int64_t o, int64_t n, V* tmp) {
  if (!Safe || o + R <= n) return p + o;
  std::memset(tmp, 0, R * sizeof(V));
  if (n > o) std::memcpy(tmp, p + o, sizeof(V) * (n - o));
  return tmp;
}

#if MS_X86

#define MS_AVX2 "avx2,fma,f16c,popcnt"
// one mask byte's 8 columns: its stored values (from p on, 8 readable) in their lanes as float32, 0 elsewhere.
// 16-bit values are placed by one byte shuffle (bf16 straight into the upper halves of float32 lanes), which
// does less per chunk than a float32 permutation plus a mask.
template <typename V>
inline __m256 expand8(const V* p, uint8_t byte);
template <>
__attribute__((target(MS_AVX2))) inline __m256 expand8(const at::Half* p, uint8_t byte) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(T.sh16[byte]))));
}
template <>
__attribute__((target(MS_AVX2))) inline __m256 expand8(const at::BFloat16* p, uint8_t byte) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(T.shbf[byte]))));
}
template <>
__attribute__((target(MS_AVX2))) inline __m256 expand8(const float* p, uint8_t byte) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(T.expand[byte]));
  const __m256 on = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(T.lane_on[byte])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx), on);
}

// One row. Four mask bytes (32 columns) per step: their values' offsets come from popcounts of the same word,
// so the only serial dependence is one add per step, and 4 accumulators (BB = 1) hide the FMA latency. Chunks
// without stored weights are not skipped: a branch taken at random (0.7^8 = 6% of chunks at 70%) costs more
// than the multiply by zero. ``Safe``: the row ends within 8 values of the buffer's end, so reads near it go
// through a zero-padded copy (only the last row or two of a layer).
template <typename V, int BB, bool Safe>
__attribute__((target(MS_AVX2))) inline void row_avx2(const float* x, int64_t K, const uint8_t* m, const V* vals,
                                                      int64_t off, int64_t nnz, float* y, int64_t N, int64_t r) {
  constexpr int NA = BB == 1 ? 4 : (BB == 2 ? 2 : 1);
  alignas(32) V tmp[8];
  __m256 acc[BB][NA];
  for (int b = 0; b < BB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  const int64_t nb = K / 8;
  int64_t j = 0;
  for (; j + 4 <= nb; j += 4) {
    uint32_t word;
    std::memcpy(&word, m + j, 4);  // bytes j..j+3 in memory order: byte j is the low one
    const int64_t o[4] = {off, off + T.pop[word & 0xFF], off + __builtin_popcount(word & 0xFFFF),
                          off + __builtin_popcount(word & 0xFFFFFF)};
    off += __builtin_popcount(word);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      // the mask byte loaded again: cheaper than shifting it out of the word
      const __m256 w = expand8(readable<8, Safe>(vals, o[i], nnz, tmp), m[j + i]);
      for (int b = 0; b < BB; ++b)
        acc[b][i % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + (j + i) * 8), acc[b][i % NA]);
    }
  }
  for (; j < nb; ++j) {
    const __m256 w = expand8(readable<8, Safe>(vals, off, nnz, tmp), m[j]);
    off += T.pop[m[j]];
    for (int b = 0; b < BB; ++b) acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + j * 8), acc[b][0]);
  }
  for (int b = 0; b < BB; ++b) y[b * N + r] = hsum_avx2(acc[b]);
}

template <typename V, int BB>
__attribute__((target(MS_AVX2))) void rows_avx2(const float* x, int64_t K, const uint8_t* mask, const V* vals,
                                               const int64_t* row_ptr, int64_t nnz, float* y, int64_t N, int64_t r0,
                                               int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    if (row_ptr[r + 1] + 8 <= nnz) row_avx2<V, BB, false>(x, K, m, vals, row_ptr[r], nnz, y, N, r);
    else row_avx2<V, BB, true>(x, K, m, vals, row_ptr[r], nnz, y, N, r);
  }
}

#define MS_AVX512 "avx512f,avx512bw,avx512vl,avx512vbmi2,gfni,avx2,fma,f16c,popcnt"
// 16-bit values, 32 columns per step: one vpexpandw places the step's stored values in their lanes (zero
// elsewhere), straight from the mask word, its bits reversed per byte by one GF(2) affine map (the file's bytes
// are most significant bit first). fp16 lanes are then converted (two vcvtph2ps); bf16 lanes are widened by
// interleaving with zeros, which puts columns {0-3, 8-11, ...} in the low register and {4-7, 12-15, ...} in the
// high one, so the input vector is read in that order (``step_x``, once per call). Measured on AMD Zen 4
// against the byte-shuffle AVX2 loop (1536 x 576 at 70%, 2 threads): fp16 ~15% faster, bf16 ~40%; the expansion
// and the fp16 conversion are what bound it.
template <typename V>
__attribute__((target(MS_AVX512))) inline void widen32(__m512i v, __m512& lo, __m512& hi);
template <>
__attribute__((target(MS_AVX512))) inline void widen32<at::Half>(__m512i v, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
}
template <>
__attribute__((target(MS_AVX512))) inline void widen32<at::BFloat16>(__m512i v, __m512& lo, __m512& hi) {
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}

// each byte's bits reversed, so bit l of the result is column l of the 64 (bytes in memory order)
__attribute__((target(MS_AVX512))) inline uint64_t lane_bits(uint64_t file_bytes) {
  const __m128i r = _mm_gf2p8affine_epi64_epi8(_mm_cvtsi64_si128(static_cast<long long>(file_bytes)),
                                               _mm_set1_epi64x(0x8040201008040201LL), 0);
  return static_cast<uint64_t>(_mm_cvtsi128_si64(r));
}

// 32 columns whose lane bits are ``k`` into accumulators A and A + 1; x (each of the BB vectors, stride Kp) is
// padded to whole steps, so only the values may need the zero-padded copy (``Safe``)
template <typename V, int BB, bool Safe, int A>
__attribute__((target(MS_AVX512))) inline void step_exp(const float* x, int64_t Kp, int64_t c, uint32_t k,
                                                        const V* vals, int64_t& off, int64_t nnz, V* tmp,
                                                        __m512 (&acc)[BB][4]) {
  const V* p = readable<32, Safe>(vals, off, nnz, tmp);
  __m512 lo, hi;
  widen32<V>(_mm512_maskz_expand_epi16(k, _mm512_loadu_si512(p)), lo, hi);
  off += __builtin_popcount(k);
  for (int b = 0; b < BB; ++b) {
    acc[b][A] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + b * Kp + c), acc[b][A]);
    acc[b][A + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * Kp + c + 16), acc[b][A + 1]);
  }
}

// One row: 64 columns per iteration into 4 accumulators, then the last (up to 56) columns a step at a time, their
// mask bytes gathered one by one (a row's last byte may be the buffer's last).
template <typename V, int BB, bool Safe>
__attribute__((target(MS_AVX512))) inline void row_avx512(const float* x, int64_t K, int64_t Kp, const uint8_t* m,
                                                          const V* vals, int64_t off, int64_t nnz, float* y,
                                                          int64_t N, int64_t r) {
  alignas(64) V tmp[32];
  __m512 acc[BB][4];
  for (int b = 0; b < BB; ++b)
    for (int a = 0; a < 4; ++a) acc[b][a] = _mm512_setzero_ps();
  const int64_t nb = K / 8;
  int64_t j = 0;
  for (; j + 8 <= nb; j += 8) {
    uint64_t w;
    std::memcpy(&w, m + j, 8);
    const uint64_t l = lane_bits(w);
    step_exp<V, BB, Safe, 0>(x, Kp, j * 8, static_cast<uint32_t>(l), vals, off, nnz, tmp, acc);
    step_exp<V, BB, Safe, 2>(x, Kp, j * 8 + 32, static_cast<uint32_t>(l >> 32), vals, off, nnz, tmp, acc);
  }
  for (; j < nb; j += 4) {
    uint64_t w = 0;
    for (int64_t i = 0; i < std::min<int64_t>(4, nb - j); ++i) w |= static_cast<uint64_t>(m[j + i]) << (8 * i);
    step_exp<V, BB, true, 0>(x, Kp, j * 8, static_cast<uint32_t>(lane_bits(w)), vals, off, nnz, tmp, acc);
  }
  for (int b = 0; b < BB; ++b)
    y[b * N + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                      _mm512_add_ps(acc[b][2], acc[b][3])));
}

template <typename V, int BB>
__attribute__((target(MS_AVX512))) void rows_avx512(const float* x, int64_t K, int64_t Kp, const uint8_t* mask,
                                                    const V* vals, const int64_t* row_ptr, int64_t nnz, float* y,
                                                    int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    if (row_ptr[r + 1] + 32 <= nnz) row_avx512<V, BB, false>(x, K, Kp, m, vals, row_ptr[r], nnz, y, N, r);
    else row_avx512<V, BB, true>(x, K, Kp, m, vals, row_ptr[r], nnz, y, N, r);
  }
}

#endif

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

Isa best_isa() {
#if MS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
      __builtin_cpu_supports("gfni"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

// ``x``'s vectors are ``xs`` apart: K, or (the AVX-512 16-bit loop) the padded width of ``step_x``
template <typename V, int BB>
void run_rows(Isa isa, const float* x, int64_t xs, int64_t K, const uint8_t* mask, const V* vals,
              const int64_t* row_ptr, int64_t nnz, float* y, int64_t N, int64_t r0, int64_t r1) {
#if MS_X86
  if constexpr (!std::is_same_v<V, float>) {
    if (isa == Isa::avx512) return rows_avx512<V, BB>(x, K, xs, mask, vals, row_ptr, nnz, y, N, r0, r1);
  }
  // float32 values (rare: a float32 checkpoint) take the AVX2 loop on an AVX-512 CPU too
  if (isa >= Isa::avx2) return rows_avx2<V, BB>(x, K, mask, vals, row_ptr, nnz, y, N, r0, r1);
#endif
  rows_scalar<V>(x, BB, K, mask, vals, row_ptr, y, N, r0, r1);
}

// x as the AVX-512 16-bit loop reads it: each vector zero-padded to whole 32-column steps, and for bf16 each
// step's columns in the order its widening leaves them (0-3, 8-11, 16-19, 24-27, then 4-7, 12-15, ...). fp16
// with K a multiple of 32 reads x as it is (a copy per call costs ~5 us, a sizeable part of a small layer's call).
template <typename V>
torch::Tensor step_x(const torch::Tensor& x) {
  const int64_t B = x.size(0), K = x.size(1), Kp = (K + 31) / 32 * 32;
  constexpr bool bf16 = std::is_same_v<V, at::BFloat16>;
  if (!bf16 && Kp == K) return x;
  auto out = torch::empty({B, Kp}, x.options());
  const float* s = x.data_ptr<float>();
  float* d = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* sb = s + b * K;
    float* db = d + b * Kp;
    if constexpr (bf16) {
      for (int64_t c = 0; c < Kp; ++c) {  // of each 8 columns, 4 to the low half of their step, 4 to the high one
        const int64_t q = c % 32, w = q % 8;
        db[c - q + (w < 4 ? 0 : 16) + q / 8 * 4 + w % 4] = c < K ? sb[c] : 0.f;
      }
    } else {
      std::memcpy(db, sb, sizeof(float) * K);
      for (int64_t c = K; c < Kp; ++c) db[c] = 0.f;
    }
  }
  return out;
}

// Up to 4 input vectors share one expansion of the weights (their accumulators stay in registers); more are done
// 4 at a time. ``f(bb, x, y)`` runs vectors x..x+BB into y..y+BB, with BB = decltype(bb)::value.
template <typename F>
void in_batches(const float* x, int64_t B, int64_t K, float* y, int64_t N, F&& f) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * K;  // K: the vectors' stride
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: f(std::integral_constant<int, 1>{}, xb, yb); break;
      case 2: f(std::integral_constant<int, 2>{}, xb, yb); break;
      case 3: f(std::integral_constant<int, 3>{}, xb, yb); break;
      default: f(std::integral_constant<int, 4>{}, xb, yb); break;
    }
  }
}

// ``f(pointer)`` with ``t``'s data as at::Half, at::BFloat16 or float
template <typename F>
void with_floats(const torch::Tensor& t, const char* what, F&& f) {
  if (t.scalar_type() == torch::kHalf) f(t.data_ptr<at::Half>());
  else if (t.scalar_type() == torch::kBFloat16) f(t.data_ptr<at::BFloat16>());
  else {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, what, ": float16, bfloat16 or float32");
    f(t.data_ptr<float>());
  }
}


// ---- bitmask + 4-bit codes (mixsparse's "quantized" encoding with bits=4) ----------------------------------
// The stored weights' codes are 4-bit, most significant first, in the values' order; row r's first code is
// code number row_ptr[r]. Group g of a row (group_size columns) has scale[r, g] and zero point zero[r, g]
// (symmetric grids: 8); the weight is (code - zero) * scale, in float32. With group_size a multiple of 32, every
// instruction set runs one AVX2 loop (an AVX-512 expansion-based one was slower on Zen 4): a row's codes are
// unpacked to bytes (minus 8 on a symmetric grid) a row ahead, then per 8 columns one broadcast, shuffle, conversion and
// FMA. That is more vector work per stored byte than the 16-bit loops do, so it is bound by its instructions, not
// by memory. Groups a multiple of 8 but not of 32 take a loop that decodes 8 codes per chunk; others, the scalar
// reference.

// 8 codes starting at code k, as the top 32 bits (MSB first); reads 8 bytes (near the end of the buffer, from a
// zero-padded copy)
inline uint32_t nibbles8(const uint8_t* codes, int64_t k, int64_t nbytes) {
  uint8_t buf[8];
  const uint8_t* p = readable<8, true>(codes, k >> 1, nbytes, buf);
  uint64_t u;
  std::memcpy(&u, p, 8);
  u = __builtin_bswap64(u) << (4 * (k & 1));
  return static_cast<uint32_t>(u >> 32);
}

template <typename S>
inline float sc(const S* p) { return static_cast<float>(*p); }

#if MS_X86
// a group's scale in the vector loops: c10's half-to-float conversion, compiled without F16C, is a dozen scalar
// instructions per group, which cost ~15% of a 4-bit layer's time
template <typename S>
inline float sc_fast(const S* p) { return static_cast<float>(*p); }
template <>
__attribute__((target(MS_AVX2))) inline float sc_fast<at::Half>(const at::Half* p) { return _cvtsh_ss(p->x); }
template <>
inline float sc_fast<at::BFloat16>(const at::BFloat16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif

template <typename S>
void rows_q4_scalar(const float* x, int64_t B, int64_t K, const uint8_t* mask, const uint8_t* codes,
                    const int64_t* row_ptr, const S* scale, const uint8_t* zero, int64_t G, float* y, int64_t N,
                    int64_t r0, int64_t r1) {
  const int64_t gs = K / G;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t k = row_ptr[r];
    for (int64_t b = 0; b < B; ++b) y[b * N + r] = 0.f;
    for (int64_t c = 0; c < K; ++c) {
      if (!(m[c >> 3] & (0x80 >> (c & 7)))) continue;
      const uint8_t byte = codes[k >> 1];
      const int code = (k & 1) ? (byte & 15) : (byte >> 4);
      ++k;
      const int64_t g = r * G + c / gs;
      const float w = (static_cast<float>(code) - (zero ? static_cast<float>(zero[g]) : 8.f)) * sc(scale + g);
      for (int64_t b = 0; b < B; ++b) y[b * N + r] += w * x[b * K + c];
    }
  }
}

#if MS_X86
// 16 bytes of 4-bit codes (most significant nibble first) as 32 bytes, one code each, minus the zero point zb
__attribute__((target(MS_AVX2))) inline void unpack32(const uint8_t* p, __m256i zb, int8_t* out) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // each 16-bit lane: its byte's high nibble in the low byte (the first code), the low nibble in the high byte
  const __m256i nib = _mm256_or_si256(_mm256_srli_epi16(w, 4), _mm256_and_si256(_mm256_slli_epi16(w, 8),
                                                                                 _mm256_set1_epi16(0x0F00)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi8(nib, zb));
}

// Row r's codes (numbers k0 .. k1 - 1) as bytes minus ``sub``, code k0 & ~1 at out[0], 32 codes at a time; out
// holds k1 - k0 + 64 bytes. ``Safe``: the row's codes end within 32 bytes of the buffer's end.
template <bool Safe>
__attribute__((target(MS_AVX2))) inline void unpack_row(const uint8_t* codes, int64_t nbytes, int64_t k0, int64_t k1,
                                                        int sub, int8_t* out) {
  alignas(32) uint8_t pad[32];
  const int64_t base = k0 & ~int64_t{1};
  const __m256i zb = _mm256_set1_epi8(static_cast<char>(sub));
  for (int64_t u = base; u < k1; u += 32) unpack32(readable<32, Safe>(codes, u >> 1, nbytes, pad), zb, out + (u - base));
}

// One row from its unpacked codes (``buf``: unpack_row's output), 32 columns (4 mask bytes) per step;
// group_size is a multiple of 32, so a step lies in one group. Each mask byte's codes are shuffled into the top
// byte of their 32-bit lanes, so one integer conversion gives (code - zero) * 2^24 exactly; the group's scale
// (times 2^-24) multiplies the group's sums once. Per 8 columns: a broadcast, a shuffle, a conversion, an FMA.
// Symmetric grids had their 8 subtracted when unpacked; with zero points (``zero``, the row's), each chunk
// subtracts its group's from the 8 codes it reads (one more instruction: cheaper than unpacking group by group).
template <typename S, int BB>
__attribute__((target(MS_AVX2))) inline void row_q4_avx2(const float* x, int64_t K, const uint8_t* m,
                                                         const int8_t* buf, const S* scale, const uint8_t* zero,
                                                         int64_t gs, float* y, int64_t N, int64_t r) {
  constexpr int NA = BB == 1 ? 4 : (BB == 2 ? 2 : 1);
  __m256 acc[BB][NA];
  for (int b = 0; b < BB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  const int8_t* p = buf;
  for (int64_t j = 0; j < K / 8; ++scale) {
    const __m256i zb = _mm256_set1_epi8(static_cast<char>(zero ? *zero++ : 0));
    __m256 part[BB][NA];
    for (int b = 0; b < BB; ++b)
      for (int a = 0; a < NA; ++a) part[b][a] = _mm256_setzero_ps();
    for (const int64_t end = j + gs / 8; j < end; j += 4) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const uint8_t byte = m[j + i];
        int64_t eight;
        std::memcpy(&eight, p, 8);
        p += T.pop[byte];
        __m256i src = _mm256_set1_epi64x(eight);
        if (zero) src = _mm256_sub_epi8(src, zb);
        const __m256i q = _mm256_shuffle_epi8(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(T.sh8top[byte])));
        const __m256 w = _mm256_cvtepi32_ps(q);
        for (int b = 0; b < BB; ++b)
          part[b][i % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + (j + i) * 8), part[b][i % NA]);
      }
    }
    const __m256 sv = _mm256_set1_ps(sc_fast(scale) * 0x1p-24f);
    for (int b = 0; b < BB; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_fmadd_ps(part[b][a], sv, acc[b][a]);
  }
  for (int b = 0; b < BB; ++b) y[b * N + r] = hsum_avx2(acc[b]);
}

// group_size a multiple of 8 but not of 32: one chunk (and one group look-up) at a time
template <typename S, int BB>
__attribute__((target(MS_AVX2))) void rows_q4_avx2_narrow(const float* x, int64_t K, const uint8_t* mask,
                                                          const uint8_t* codes, int64_t nbytes, const int64_t* row_ptr,
                                                          const S* scale, const uint8_t* zero, int64_t G, float* y,
                                                          int64_t N, int64_t r0, int64_t r1) {
  const int64_t gs = K / G;
  const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t k = row_ptr[r];
    __m256 acc[BB];
    for (int b = 0; b < BB; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t c8 = 0; c8 < K / 8; ++c8) {
      const uint8_t bits = m[c8];
      const int64_t g = r * G + (c8 * 8) / gs;
      const __m256i cv = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(nibbles8(codes, k, nbytes))),
                                                            shifts), low4);
      const __m256 wq = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(cv), _mm256_set1_ps(zero ? static_cast<float>(zero[g]) : 8.f)),
                                      _mm256_set1_ps(sc_fast(scale + g)));
      __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(T.expand[bits]));
      __m256 on = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(T.lane_on[bits])));
      __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(wq, idx), on);
      k += T.pop[bits];
      for (int b = 0; b < BB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + c8 * 8), acc[b]);
    }
    for (int b = 0; b < BB; ++b) y[b * N + r] = hsum_avx2(acc[b]);
  }
}

template <typename S, int BB>
__attribute__((target(MS_AVX2))) void rows_q4_avx2(const float* x, int64_t K, const uint8_t* mask,
                                                  const uint8_t* codes, int64_t nbytes, const int64_t* row_ptr,
                                                  const S* scale, const uint8_t* zero, int64_t G, float* y, int64_t N,
                                                  int64_t r0, int64_t r1) {
  const int64_t gs = K / G;
  if (gs % 32) return rows_q4_avx2_narrow<S, BB>(x, K, mask, codes, nbytes, row_ptr, scale, zero, G, y, N, r0, r1);
  // each row's codes are unpacked a row ahead of their use (two buffers): a load from a store still in flight
  // waits for it, and unpacking a step's codes right before its loads cost ~25% of the time
  std::vector<int8_t> store(2 * (K + 64) + 32);
  int8_t* first = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(store.data()) + 31) & ~uintptr_t{31});
  int8_t* bufs[2] = {first, first + K + 64};
  auto unpack = [&](int64_t r) {
    const int sub = zero ? 0 : 8;  // zero points: subtracted per group when the codes are used
    if ((row_ptr[r + 1] >> 1) + 32 <= nbytes)
      unpack_row<false>(codes, nbytes, row_ptr[r], row_ptr[r + 1], sub, bufs[r & 1]);
    else
      unpack_row<true>(codes, nbytes, row_ptr[r], row_ptr[r + 1], sub, bufs[r & 1]);
  };
  if (r0 < r1) unpack(r0);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + 1 < r1) unpack(r + 1);
    row_q4_avx2<S, BB>(x, K, mask + r * (K / 8), bufs[r & 1] + (row_ptr[r] & 1), scale + r * G,
                       zero ? zero + r * G : nullptr, gs, y, N, r);
  }
}

#endif

template <typename S, int BB>
void run_q4(Isa isa, const float* x, int64_t K, const uint8_t* mask, const uint8_t* codes, int64_t nbytes,
            const int64_t* row_ptr, const S* scale, const uint8_t* zero, int64_t G, float* y, int64_t N, int64_t r0,
            int64_t r1) {
#if MS_X86
  const int64_t gs = K / G;
  // AVX-512 CPUs take the AVX2 loop too: a vpexpandb version (expand, widen, convert 16 lanes at a time) was
  // ~70% slower on Zen 4
  if (isa >= Isa::avx2 && gs % 8 == 0)
    return rows_q4_avx2<S, BB>(x, K, mask, codes, nbytes, row_ptr, scale, zero, G, y, N, r0, r1);
#endif
  rows_q4_scalar<S>(x, BB, K, mask, codes, row_ptr, scale, zero, G, y, N, r0, r1);
}



// ---- dense 16-bit or int8 rows (the tied embedding / LM head) ------------------------------------------------
// y[b, r] = scale[r] * sum_c W[r, c] x[b, c], W (N, K) fp16, bf16 or int8 with one float32 scale per row (1 for the
// 16-bit kinds). On a small model the head is the largest matrix a token reads (28 M of SmolLM2-135M's 135 M
// weights); a dense row needs neither a bitmask nor a shuffle, so it gets its own loop.
template <typename W>
inline float wf(W v) { return static_cast<float>(v); }
template <>
inline float wf<int8_t>(int8_t v) { return static_cast<float>(v); }

template <typename W>
void dense_rows_scalar(const float* x, int64_t B, int64_t K, const W* w, const float* scale, float* y, int64_t N,
                       int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t c = 0; c < K; ++c) s += wf<W>(w[r * K + c]) * x[b * K + c];
      y[b * N + r] = scale ? s * scale[r] : s;
    }
}

#if MS_X86
template <typename W>
inline __m256 load8w(const W* p);
template <>
__attribute__((target(MS_AVX2))) inline __m256 load8w(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
__attribute__((target(MS_AVX2))) inline __m256 load8w(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <>
__attribute__((target(MS_AVX2))) inline __m256 load8w(const float* p) { return _mm256_loadu_ps(p); }
template <>
__attribute__((target(MS_AVX2))) inline __m256 load8w(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <typename W, int BB>
__attribute__((target(MS_AVX2))) void dense_rows_avx2(const float* x, int64_t K, const W* w, const float* scale,
                                                      float* y, int64_t N, int64_t r0, int64_t r1) {
  constexpr int NA = BB == 1 ? 4 : (BB == 2 ? 2 : 1);
  for (int64_t r = r0; r < r1; ++r) {
    const W* row = w + r * K;
    __m256 acc[BB][NA];
    for (int b = 0; b < BB; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= K; c += 32) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m256 v = load8w(row + c + 8 * i);
        for (int b = 0; b < BB; ++b)
          acc[b][i % NA] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + b * K + c + 8 * i), acc[b][i % NA]);
      }
    }
    for (; c < K; c += 8) {
      const __m256 v = load8w(row + c);
      for (int b = 0; b < BB; ++b) acc[b][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + b * K + c), acc[b][0]);
    }
    for (int b = 0; b < BB; ++b) {
      const float s = hsum_avx2(acc[b]);
      y[b * N + r] = scale ? s * scale[r] : s;
    }
  }
}

template <typename W>
inline __m512 load16w(const W* p);
template <>
__attribute__((target(MS_AVX512))) inline __m512 load16w(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
__attribute__((target(MS_AVX512))) inline __m512 load16w(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <>
__attribute__((target(MS_AVX512))) inline __m512 load16w(const float* p) { return _mm512_loadu_ps(p); }
template <>
__attribute__((target(MS_AVX512))) inline __m512 load16w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// K a multiple of 16 (the caller's check)
template <typename W, int BB>
__attribute__((target(MS_AVX512))) void dense_rows_avx512(const float* x, int64_t K, const W* w, const float* scale,
                                                          float* y, int64_t N, int64_t r0, int64_t r1) {
  constexpr int NA = BB == 1 ? 4 : (BB == 2 ? 2 : 1);
  for (int64_t r = r0; r < r1; ++r) {
    const W* row = w + r * K;
    __m512 acc[BB][NA];
    for (int b = 0; b < BB; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= K; c += 64) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512 v = load16w(row + c + 16 * i);
        for (int b = 0; b < BB; ++b)
          acc[b][i % NA] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + b * K + c + 16 * i), acc[b][i % NA]);
      }
    }
    for (; c < K; c += 16) {
      const __m512 v = load16w(row + c);
      for (int b = 0; b < BB; ++b) acc[b][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + b * K + c), acc[b][0]);
    }
    for (int b = 0; b < BB; ++b) {
      __m512 s = acc[b][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[b][a]);
      const float t = _mm512_reduce_add_ps(s);
      y[b * N + r] = scale ? t * scale[r] : t;
    }
  }
}
#endif

template <typename W, int BB>
void run_dense(Isa isa, const float* x, int64_t K, const W* w, const float* scale, float* y, int64_t N, int64_t r0,
               int64_t r1) {
#if MS_X86
  if (isa == Isa::avx512 && K % 16 == 0) return dense_rows_avx512<W, BB>(x, K, w, scale, y, N, r0, r1);
  if (isa >= Isa::avx2 && K % 8 == 0) return dense_rows_avx2<W, BB>(x, K, w, scale, y, N, r0, r1);
#endif
  dense_rows_scalar<W>(x, BB, K, w, scale, y, N, r0, r1);
}

}  // namespace

int64_t isa_level(int64_t wanted) {
  const int64_t best = static_cast<int64_t>(best_isa());
  return wanted < 0 ? best : std::min(wanted, best);
}

// x: (B, K) float32 contiguous; mask: uint8 (N*K/8); values: (nnz,) half, bfloat16 or float32; row_ptr: int64 (N+1)
torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr,
                             int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, K) float32");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0, "K must be a multiple of 8 (rows of the bitmask are byte-aligned)");
  TORCH_CHECK(mask.scalar_type() == torch::kUInt8 && mask.numel() >= N * K / 8, "mask: uint8 with N*K/8 bytes");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && row_ptr.numel() == N + 1, "row_ptr: int64 (N+1)");
  TORCH_CHECK(values.is_contiguous() && row_ptr.is_contiguous() && mask.is_contiguous() &&
              row_ptr.data_ptr<int64_t>()[N] <= values.numel(), "values: contiguous, at least row_ptr[N] of them");
  auto y = torch::empty({B, N}, x.options());
  const Isa level = static_cast<Isa>(isa_level(isa));
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t nnz = values.numel();
  // a chunk of rows per task: a few thousand weights each, so 2 threads split even small layers
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  with_floats(values, "values", [&](auto* vp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
    torch::Tensor xw = x;
    if constexpr (!std::is_same_v<V, float>) {
      if (level == Isa::avx512) xw = step_x<V>(x);
    }
    const float* xwp = xw.data_ptr<float>();
    const int64_t xs = xw.size(1);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      in_batches(xwp, B, xs, yp, N, [&](auto bb, const float* xb, float* yb) {
        run_rows<V, decltype(bb)::value>(level, xb, xs, K, mp, vp, rp, nnz, yb, N, r0, r1);
      });
    });
  });
  return y;
}


// x: (B, K) float32; mask: uint8 (N*K/8); codes: uint8, 4-bit codes packed; row_ptr: int64 (N+1);
// scale: (N, G) half, bfloat16 or float32; zero: (N, G) uint8, or empty for a symmetric grid
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor codes, torch::Tensor row_ptr,
                        torch::Tensor scale, torch::Tensor zero, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, K) float32");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0 && mask.numel() >= N * K / 8 && row_ptr.numel() == N + 1, "bad bitmask layout");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0 &&
              scale.is_contiguous(), "scale: (N, groups) contiguous, groups dividing K");
  const int64_t G = scale.size(1);
  TORCH_CHECK(zero.numel() == 0 || (zero.scalar_type() == torch::kUInt8 && zero.numel() == N * G &&
              zero.is_contiguous()), "zero: (N, groups) uint8");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && mask.is_contiguous() &&
              row_ptr.scalar_type() == torch::kInt64 && row_ptr.is_contiguous() &&
              row_ptr.data_ptr<int64_t>()[N] <= 2 * codes.numel(), "codes: uint8, at least row_ptr[N] 4-bit codes");
  auto y = torch::empty({B, N}, x.options());
  const Isa level = static_cast<Isa>(isa_level(isa));
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* zp = zero.numel() ? zero.data_ptr<uint8_t>() : nullptr;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t nbytes = codes.numel();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  with_floats(scale, "scale", [&](auto* sp) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      in_batches(xp, B, K, yp, N, [&](auto bb, const float* xb, float* yb) {
        run_q4<S, decltype(bb)::value>(level, xb, K, mp, cp, nbytes, rp, sp, zp, G, yb, N, r0, r1);
      });
    });
  });
  return y;
}

// x: (B, K) float32; w: (N, K) float16, bfloat16 or int8; scale: (N,) float32 for int8, empty otherwise
torch::Tensor dense_matmul(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, K) float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: (N, K) contiguous");
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  const bool q8 = w.scalar_type() == torch::kInt8;
  TORCH_CHECK(q8 ? (scale.scalar_type() == torch::kFloat32 && scale.numel() == N && scale.is_contiguous())
                 : scale.numel() == 0, "int8 w needs (N,) contiguous float32 scales; 16-bit w none");
  auto y = torch::empty({B, N}, x.options());
  const Isa level = static_cast<Isa>(isa_level(isa));
  const float* xp = x.data_ptr<float>();
  const float* sp = q8 ? scale.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  auto go = [&](auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      in_batches(xp, B, K, yp, N, [&](auto bb, const float* xb, float* yb) {
        run_dense<W, decltype(bb)::value>(level, xb, K, wp, sp, yb, N, r0, r1);
      });
    });
  };
  if (q8) go(w.data_ptr<int8_t>());
  else with_floats(w, "w", go);
  return y;
}

// where each row's values start: the running count of set bits, row by row (int64, N + 1)
torch::Tensor bitmask_row_ptr(torch::Tensor mask, int64_t N, int64_t K) {
  TORCH_CHECK(K % 8 == 0 && mask.scalar_type() == torch::kUInt8 && mask.numel() >= N * K / 8, "bad bitmask layout");
  auto rp = torch::empty({N + 1}, torch::dtype(torch::kInt64));
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  int64_t* out = rp.data_ptr<int64_t>();
  out[0] = 0;
  for (int64_t r = 0; r < N; ++r) {
    int64_t c = 0;
    const uint8_t* m = mp + r * (K / 8);
    for (int64_t j = 0; j < K / 8; ++j) c += __builtin_popcount(m[j]);
    out[r + 1] = out[r] + c;
  }
  return rp;
}

// the dense float32 matrix of a bitmask-encoded weight (prefill: many tokens go through one dense GEMM)
torch::Tensor bitmask_expand(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, int64_t N, int64_t K) {
  TORCH_CHECK(K % 8 == 0 && mask.scalar_type() == torch::kUInt8 && row_ptr.numel() == N + 1, "bad bitmask layout");
  auto w = torch::zeros({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* wp = w.data_ptr<float>();
  with_floats(values, "values", [&](auto* vp) {
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t off = rp[r];
        const uint8_t* m = mp + r * (K / 8);
        float* row = wp + r * K;
        for (int64_t c8 = 0; c8 < K / 8; ++c8) {
          const uint8_t bits = m[c8];
          if (!bits) continue;
          for (int i = 0; i < 8; ++i)
            if (bits & (0x80 >> i)) row[c8 * 8 + i] = static_cast<float>(vp[off++]);
        }
      }
    });
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_row_ptr", &bitmask_row_ptr, "offsets of each row's values (running count of set bits)");
  m.def("q4_matmul", &q4_matmul, "bitmask + 4-bit codes (group scales) times x (B small)");
  m.def("bitmask_expand", &bitmask_expand, "dense float32 matrix of a bitmask-encoded weight");
  m.def("bitmask_matmul", &bitmask_matmul, "bitmask-compressed sparse W times x (B small)");
  m.def("dense_matmul", &dense_matmul, "dense fp16/bf16 or int8 (row scales) W times x (B small)");
  m.def("isa_level", &isa_level, "ISA used for a wanted level (-1: best): 0 scalar, 1 AVX2, 2 AVX-512");
}
