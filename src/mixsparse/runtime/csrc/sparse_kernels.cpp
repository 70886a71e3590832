// Sparse matrix times a few vectors for decoding on a CPU: y[b, r] = sum_c W[r, c] x[b, c], W stored as
// mixsparse's compressed "bitmask" encoding (one bit per weight, first weight in the most significant bit of
// each byte, rows byte-aligned; the non-zero values, fp16, bf16 or fp32, row-major) with per-row offsets into the
// values computed at load. Written by hand because no maintained library multiplies this format (DeepSparse,
// torchao's sparsity, vLLM's and compressed-tensors' sparse paths are gone): torch's sparse CSR matmul needs an
// int64 column index per non-zero (4x the fp16 values' bytes), which undoes the memory saving.
//
// AVX2: each mask byte's 8 columns get their stored values by one byte shuffle from a 256-entry table (fp16:
// then converted; bf16: shuffled straight into float32 lanes), four bytes per step with their offsets from
// popcounts of one word, so the loop carries one add and four FMA chains. AVX-512 (with VPOPCNTDQ and GFNI):
// 32 columns per step, each lane's value index a popcount, one two-register permutation per 16 lanes. Both
// accumulate in float32, one set of accumulators per input vector. The ISA is chosen at run time (the loader
// times both); one translation unit, per-function target attributes, so the build needs no -m flags.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
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
  uint8_t rev[256];                  // bit-reversed byte (lane order), for the AVX-512 masks
  uint8_t pop[256];                  // set bits
  alignas(16) uint8_t sh16[256][16]; // pshufb: the byte's stored 16-bit values into their lanes, 0 elsewhere
  alignas(32) uint8_t shbf[256][32]; // vpshufb on two copies of 8 stored bf16: float32 lanes (low half 0)
  alignas(16) uint8_t sh8[256][16];  // pshufb: the byte's stored 8-bit codes into its 8 lanes, 0 elsewhere
  alignas(32) int32_t expand[256][8];   // lane -> index of its value among the stored ones (prefix count)
  alignas(32) int32_t lane_on[256][8];  // -1 where the lane's weight is stored, 0 elsewhere
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int r = 0;
      for (int i = 0; i < 8; ++i) r |= ((m >> i) & 1) << (7 - i);
      rev[m] = static_cast<uint8_t>(r);
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool on = (m >> (7 - i)) & 1;
        expand[m][i] = on ? k : 0;
        lane_on[m][i] = on ? -1 : 0;
        sh8[m][i] = on ? static_cast<uint8_t>(k) : 0x80;
        sh8[m][8 + i] = 0x80;
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

// the reference: also the path for CPUs without AVX2 and for a row's tail
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

#define MS_AVX512 "avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vpopcntdq,gfni,avx2,fma,f16c,popcnt"
// 32 columns per step, from one 32-bit word of the mask read as it is in memory (the file's bytes are most
// significant bit first; one GF(2) affine map reverses each byte's bits, so bit l is column l). A lane's value
// index is the popcount of the bits below it (one vpopcntd for 16 lanes); vpermt2ps picks the values from the 32
// loaded and converted ones, zero-masked by the word. Fewer instructions per column than the AVX2 path, and no
// vpexpand, which is slow on AMD Zen 4.
template <typename V>
inline void load32(const V* p, __m512& lo, __m512& hi);
template <>
__attribute__((target(MS_AVX512))) inline void load32(const at::Half* p, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
}
template <>
__attribute__((target(MS_AVX512))) inline void load32(const at::BFloat16* p, __m512& lo, __m512& hi) {
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))), 16));
}
template <>
__attribute__((target(MS_AVX512))) inline void load32(const float* p, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(p);
  hi = _mm512_loadu_ps(p + 16);
}

// 32 columns (mask bytes j..j+3 as one little-endian word) into accumulators A and A + 1
template <typename V, int BB, bool Safe, int A>
__attribute__((target(MS_AVX512))) inline void step512(const float* x, int64_t K, int64_t j, uint32_t word,
                                                       __mmask16 xl, __mmask16 xh, const V* vals, int64_t& off,
                                                       int64_t nnz, V* tmp, __m512 (&acc)[BB][4]) {
  const __m512i bit = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i below = _mm512_sub_epi32(bit, _mm512_set1_epi32(1));
  const __m512i below_hi = _mm512_or_si512(_mm512_slli_epi32(below, 16), _mm512_set1_epi32(0xFFFF));
  // the bits of each byte reversed (a GF(2) affine map), so bit l of each lane is column l of the 32
  const __m512i wv = _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi32(static_cast<int>(word)),
                                                   _mm512_set1_epi64(0x8040201008040201LL), 0);
  // a lane's value is number (set bits below it) among the 32 loaded
  const __m512i idx_lo = _mm512_popcnt_epi32(_mm512_and_si512(wv, below));
  const __m512i idx_hi = _mm512_popcnt_epi32(_mm512_and_si512(wv, below_hi));
  __m512 v0, v1;
  load32(readable<32, Safe>(vals, off, nnz, tmp), v0, v1);
  off += __builtin_popcount(word);
  const __m512 w_lo = _mm512_maskz_permutex2var_ps(_mm512_test_epi32_mask(wv, bit), v0, idx_lo, v1);
  const __m512 w_hi = _mm512_maskz_permutex2var_ps(_mm512_test_epi32_mask(wv, _mm512_slli_epi32(bit, 16)), v0, idx_hi, v1);
  for (int b = 0; b < BB; ++b) {
    const float* xb = x + b * K + j * 8;
    acc[b][A] = _mm512_fmadd_ps(w_lo, _mm512_maskz_loadu_ps(xl, xb), acc[b][A]);
    acc[b][A + 1] = _mm512_fmadd_ps(w_hi, _mm512_maskz_loadu_ps(xh, xb + 16), acc[b][A + 1]);
  }
}

// One row, 64 columns per iteration into 4 accumulators (one FMA chain per 16 columns would wait on its
// latency). ``Safe``: the row ends within 32 values of the buffer's end.
template <typename V, int BB, bool Safe>
__attribute__((target(MS_AVX512))) inline void row_avx512(const float* x, int64_t K, const uint8_t* m, const V* vals,
                                                          int64_t off, int64_t nnz, float* y, int64_t N, int64_t r) {
  alignas(64) V tmp[32];
  __m512 acc[BB][4];
  for (int b = 0; b < BB; ++b)
    for (int a = 0; a < 4; ++a) acc[b][a] = _mm512_setzero_ps();
  const int64_t nb = K / 8;
  int64_t j = 0;
  for (; j + 8 <= nb; j += 8) {
    uint32_t w0, w1;
    std::memcpy(&w0, m + j, 4);
    std::memcpy(&w1, m + j + 4, 4);
    step512<V, BB, Safe, 0>(x, K, j, w0, 0xFFFF, 0xFFFF, vals, off, nnz, tmp, acc);
    step512<V, BB, Safe, 2>(x, K, j + 4, w1, 0xFFFF, 0xFFFF, vals, off, nnz, tmp, acc);
  }
  for (; j < nb; j += 4) {  // up to 56 columns left
    const int64_t n = std::min<int64_t>(4, nb - j);
    uint32_t word = 0;
    for (int64_t i = 0; i < n; ++i) word |= static_cast<uint32_t>(m[j + i]) << (8 * i);
    step512<V, BB, true, 0>(x, K, j, word, n >= 2 ? 0xFFFF : 0xFF, n == 4 ? 0xFFFF : (n == 3 ? 0xFF : 0), vals,
                            off, nnz, tmp, acc);
  }
  for (int b = 0; b < BB; ++b)
    y[b * N + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                      _mm512_add_ps(acc[b][2], acc[b][3])));
}

template <typename V, int BB>
__attribute__((target(MS_AVX512))) void rows_avx512(const float* x, int64_t K, const uint8_t* mask, const V* vals,
                                                    const int64_t* row_ptr, int64_t nnz, float* y, int64_t N,
                                                    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    if (row_ptr[r + 1] + 32 <= nnz) row_avx512<V, BB, false>(x, K, m, vals, row_ptr[r], nnz, y, N, r);
    else row_avx512<V, BB, true>(x, K, m, vals, row_ptr[r], nnz, y, N, r);
  }
}

#endif

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

Isa best_isa() {
#if MS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
      __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("gfni"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

template <typename V, int BB>
void run_rows(Isa isa, const float* x, int64_t K, const uint8_t* mask, const V* vals, const int64_t* row_ptr,
              int64_t nnz, float* y, int64_t N, int64_t r0, int64_t r1) {
#if MS_X86
  if (isa == Isa::avx512) return rows_avx512<V, BB>(x, K, mask, vals, row_ptr, nnz, y, N, r0, r1);
  if (isa == Isa::avx2) return rows_avx2<V, BB>(x, K, mask, vals, row_ptr, nnz, y, N, r0, r1);
#endif
  rows_scalar<V>(x, BB, K, mask, vals, row_ptr, y, N, r0, r1);
}

// Up to 4 input vectors share one expansion of the weights (their accumulators stay in registers); more are done
// 4 at a time. ``f(bb, x, y)`` runs vectors x..x+BB into y..y+BB, with BB = decltype(bb)::value.
template <typename F>
void in_batches(const float* x, int64_t B, int64_t K, float* y, int64_t N, F&& f) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * K;
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
// (symmetric grids: 8); the weight is (code - zero) * scale, in float32. Each 8 or 16 columns share one group
// (group_size is a multiple of the step), so a chunk's codes are dequantized with one scale, then expanded.

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
// One row, as row_avx2: 32 columns per step, offsets from popcounts of one word, 4 accumulators, no branch per
// chunk. Each step unpacks the (at most 33) 4-bit codes it uses into bytes once, minus the group's zero point,
// into a small buffer; each mask byte then takes its 8 lanes from there with one byte shuffle. group_size is a
// multiple of 32, so a step lies in one group: its scale and zero point are reloaded when a group ends.
// ``Safe``: the row's codes end within 32 bytes of the buffer's end (reads go through a zero-padded copy).
template <typename S, int BB, bool Safe>
__attribute__((target(MS_AVX2))) inline void row_q4_avx2(const float* x, int64_t K, const uint8_t* m,
                                                         const uint8_t* codes, int64_t nbytes, int64_t k,
                                                         const S* scale, const uint8_t* zero, int64_t gs, float* y,
                                                         int64_t N, int64_t r) {
  constexpr int NA = BB == 1 ? 4 : (BB == 2 ? 2 : 1);
  alignas(32) int8_t buf[64];   // code number (k & 1) + i of the step minus the zero point, at buf[i]
  alignas(32) uint8_t pad[32];
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[BB][NA];
  for (int b = 0; b < BB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  __m256i zb = _mm256_setzero_si256();
  __m256 sv = _mm256_setzero_ps();
  int64_t left = 0;  // columns left in the current group
  for (int64_t j = 0; j < K / 8; j += 4) {
    if (left == 0) {
      zb = _mm256_set1_epi8(static_cast<char>(zero ? *zero++ : 8));
      sv = _mm256_set1_ps(sc(scale++));
      left = gs;
    }
    left -= 32;
    uint32_t word;
    std::memcpy(&word, m + j, 4);
    const int64_t rel[4] = {0, T.pop[m[j]], __builtin_popcount(word & 0xFFFF), __builtin_popcount(word & 0xFFFFFF)};
    const int64_t at = k >> 1;
    const int odd = static_cast<int>(k & 1);
    k += __builtin_popcount(word);
    const uint8_t* p = readable<32, Safe>(codes, at, nbytes, pad);
    // bytes at..at+16 -> nibbles, most significant first: (hi, lo) pairs interleaved per 128-bit lane
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4), lo = _mm256_and_si256(c, low4);
    const __m256i n0 = _mm256_sub_epi8(_mm256_unpacklo_epi8(hi, lo), zb);  // nibbles 0..15 | 32..47
    const __m256i n1 = _mm256_sub_epi8(_mm256_unpackhi_epi8(hi, lo), zb);  // nibbles 16..31 | 48..63
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_permute2x128_si256(n0, n1, 0x20));
    _mm_store_si128(reinterpret_cast<__m128i*>(buf + 32), _mm256_extracti128_si256(n0, 1));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(buf + odd + rel[i])),
                                         _mm_load_si128(reinterpret_cast<const __m128i*>(T.sh8[m[j + i]])));
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv);
      for (int b = 0; b < BB; ++b)
        acc[b][i % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + (j + i) * 8), acc[b][i % NA]);
    }
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
                                      _mm256_set1_ps(sc(scale + g)));
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
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    const uint8_t* z = zero ? zero + r * G : nullptr;
    // a step reads 32 bytes from its first code's byte, which is at most the row's end
    if ((row_ptr[r + 1] >> 1) + 32 <= nbytes)
      row_q4_avx2<S, BB, false>(x, K, m, codes, nbytes, row_ptr[r], scale + r * G, z, gs, y, N, r);
    else
      row_q4_avx2<S, BB, true>(x, K, m, codes, nbytes, row_ptr[r], scale + r * G, z, gs, y, N, r);
  }
}

template <typename S, int BB>
__attribute__((target(MS_AVX512))) void rows_q4_avx512(const float* x, int64_t K, const uint8_t* mask,
                                                       const uint8_t* codes, int64_t nbytes, const int64_t* row_ptr,
                                                       const S* scale, const uint8_t* zero, int64_t G, float* y,
                                                       int64_t N, int64_t r0, int64_t r1) {
  const int64_t gs = K / G;
  const __m512i shifts = _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t k = row_ptr[r];
    __m512 acc[BB];
    for (int b = 0; b < BB; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 bits = static_cast<__mmask16>(T.rev[m[c / 8]] | (T.rev[m[c / 8 + 1]] << 8));
      if (!bits) continue;
      const int64_t g = r * G + c / gs;
      const int n0 = __builtin_popcount(bits & 0xFF);  // the codes of the first 8 columns, then of the next 8
      __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(nibbles8(codes, k, nbytes)))),
          _mm256_set1_epi32(static_cast<int>(nibbles8(codes, k + n0, nbytes))), 1);
      const __m512 wq = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shifts), low4)),
                                                    _mm512_set1_ps(zero ? static_cast<float>(zero[g]) : 8.f)),
                                      _mm512_set1_ps(sc(scale + g)));
      // lanes 0..n0-1 hold the first half's codes, lanes 8.. the second's: expand each half by its own mask
      const __m512 w = _mm512_mask_expand_ps(_mm512_maskz_expand_ps(bits & 0xFF, wq), bits & 0xFF00,
                                             _mm512_shuffle_f32x4(wq, wq, 0xEE));
      k += __builtin_popcount(bits);
      for (int b = 0; b < BB; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * K + c), acc[b]);
    }
    for (int b = 0; b < BB; ++b) y[b * N + r] = _mm512_reduce_add_ps(acc[b]);
  }
}
#endif

template <typename S, int BB>
void run_q4(Isa isa, const float* x, int64_t K, const uint8_t* mask, const uint8_t* codes, int64_t nbytes,
            const int64_t* row_ptr, const S* scale, const uint8_t* zero, int64_t G, float* y, int64_t N, int64_t r0,
            int64_t r1) {
#if MS_X86
  const int64_t gs = K / G;
  if (isa == Isa::avx512 && K % 16 == 0 && gs % 16 == 0)
    return rows_q4_avx512<S, BB>(x, K, mask, codes, nbytes, row_ptr, scale, zero, G, y, N, r0, r1);
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

// x: (B, K) float32 contiguous; mask: uint8 (N*K/8); values: (nnz,) half or bfloat16; row_ptr: int64 (N+1)
torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr,
                             int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, K) float32");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0, "K must be a multiple of 8 (rows of the bitmask are byte-aligned)");
  TORCH_CHECK(mask.scalar_type() == torch::kUInt8 && mask.numel() >= N * K / 8, "mask: uint8 with N*K/8 bytes");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && row_ptr.numel() == N + 1, "row_ptr: int64 (N+1)");
  auto y = torch::empty({B, N}, x.options());
  const Isa level = static_cast<Isa>(isa_level(isa));
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t nnz = values.numel();
  // a chunk of rows per task: a few thousand weights each, so 2 threads split even small layers
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  with_floats(values, "values", [&](auto* vp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      in_batches(xp, B, K, yp, N, [&](auto bb, const float* xb, float* yb) {
        run_rows<V, decltype(bb)::value>(level, xb, K, mp, vp, rp, nnz, yb, N, r0, r1);
      });
    });
  });
  return y;
}


// x: (B, K) float32; mask: uint8 (N*K/8); codes: uint8, 4-bit codes packed; row_ptr: int64 (N+1);
// scale: (N, G) half or bfloat16; zero: (N, G) uint8, or empty for a symmetric grid
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor codes, torch::Tensor row_ptr,
                        torch::Tensor scale, torch::Tensor zero, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, K) float32");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0 && mask.numel() >= N * K / 8 && row_ptr.numel() == N + 1, "bad bitmask layout");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && K % scale.size(1) == 0, "scale: (N, groups)");
  const int64_t G = scale.size(1);
  TORCH_CHECK(zero.numel() == 0 || (zero.scalar_type() == torch::kUInt8 && zero.numel() == N * G), "zero: (N, groups) uint8");
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
