// Sparse matrix times a few vectors for decoding on a CPU: y[b, r] = sum_c W[r, c] x[b, c], W stored as
// mixsparse's compressed "bitmask" encoding (one bit per weight, first weight in the most significant bit of
// each byte, rows byte-aligned; the non-zero values, fp16, bf16 or fp32, row-major) with per-row offsets into the
// values computed at load. Written by hand because no maintained library multiplies this format (DeepSparse,
// torchao's sparsity, vLLM's and compressed-tensors' sparse paths are gone): torch's sparse CSR matmul needs an
// int64 column index per non-zero (4x the fp16 values' bytes), which undoes the memory saving.
//
// Each 8 (AVX2) or 16 (AVX-512) columns: the mask's set bits say which weights are stored; the stored values
// are expanded into their lanes (AVX2: a permutation from a 256-entry table; AVX-512 VBMI2: expand),
// converted to fp32 and multiplied into fp32 accumulators, one per input vector. The ISA is chosen at run time;
// one translation unit, per-function target attributes, so the build needs no -m flags.
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
  uint8_t rev[256];          // bit-reversed byte: the file's MSB-first order to lane order (bit i = lane i)
  int32_t expand[256][8];    // lane -> index of its value among the stored ones (prefix count)
  int32_t lane_on[256][8];   // -1 where the lane's weight is stored, 0 elsewhere
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int r = 0;
      for (int i = 0; i < 8; ++i) r |= ((m >> i) & 1) << (7 - i);
      rev[m] = static_cast<uint8_t>(r);
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        bool on = (m >> i) & 1;
        expand[m][i] = on ? k : 0;
        lane_on[m][i] = on ? -1 : 0;
        k += on;
      }
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
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const at::BFloat16* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <typename V, int BB>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const float* x, int64_t K, const uint8_t* mask,
                                                       const V* vals, const int64_t* row_ptr, int64_t nnz, float* y,
                                                       int64_t N, int64_t r0, int64_t r1) {
  alignas(32) V tmp[8];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t off = row_ptr[r];
    __m256 acc[BB];
    for (int b = 0; b < BB; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t c8 = 0; c8 < K / 8; ++c8) {
      const uint8_t bits = T.rev[m[c8]];
      if (!bits) continue;
      const V* src = vals + off;
      if (off + 8 > nnz) {  // the last values: never read past the buffer
        std::memset(tmp, 0, sizeof(tmp));
        std::memcpy(tmp, src, sizeof(V) * (nnz - off));
        src = tmp;
      }
      __m256 packed = load8_avx2(src);
      __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T.expand[bits]));
      __m256 on = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(T.lane_on[bits])));
      __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), on);
      off += __builtin_popcount(bits);
      for (int b = 0; b < BB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + c8 * 8), acc[b]);
    }
    for (int b = 0; b < BB; ++b) y[b * N + r] = hsum_avx2(acc[b]);
  }
}

#define MS_AVX512 "avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c"
// register-form expands: the memory forms (expand-load) are microcoded and slow on AMD Zen 4. Callers pass a
// pointer with 16 readable values (a row's chunks near the end of the buffer go through a copy).
__attribute__((target(MS_AVX512))) inline __m512 expand16(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
__attribute__((target(MS_AVX512))) inline __m512 expand16(const at::BFloat16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_expand_epi16(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
__attribute__((target(MS_AVX512))) inline __m512 expand16(const float* p, __mmask16 m) {
  return _mm512_maskz_expand_ps(m, _mm512_loadu_ps(p));
}

template <typename V, int BB>
__attribute__((target(MS_AVX512))) void rows_avx512(const float* x, int64_t K, const uint8_t* mask, const V* vals,
                                                    const int64_t* row_ptr, int64_t nnz, float* y, int64_t N,
                                                    int64_t r0, int64_t r1) {
  const int64_t K16 = K / 16 * 16;
  alignas(64) V tmp[16];
  auto safe = [&](int64_t off) -> const V* {  // 16 readable values from off
    if (off + 16 <= nnz) return vals + off;
    std::memset(tmp, 0, sizeof(tmp));
    if (nnz > off) std::memcpy(tmp, vals + off, sizeof(V) * (nnz - off));
    return tmp;
  };
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * (K / 8);
    int64_t off = row_ptr[r];
    __m512 acc[BB];
    for (int b = 0; b < BB; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K16; c += 16) {
      const __mmask16 bits = static_cast<__mmask16>(T.rev[m[c / 8]] | (T.rev[m[c / 8 + 1]] << 8));
      if (!bits) continue;
      __m512 w = expand16(safe(off), bits);
      off += __builtin_popcount(bits);
      for (int b = 0; b < BB; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * K + c), acc[b]);
    }
    if (K16 < K) {  // 8 columns left
      const __mmask16 bits = T.rev[m[K16 / 8]];
      __m512 w = expand16(safe(off), bits);
      off += __builtin_popcount(bits);
      for (int b = 0; b < BB; ++b)
        acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(0xFF, x + b * K + K16), acc[b]);
    }
    for (int b = 0; b < BB; ++b) y[b * N + r] = _mm512_reduce_add_ps(acc[b]);
  }
}
#endif

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

Isa best_isa() {
#if MS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
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

// 8 codes starting at code k, as the top 32 bits (MSB first); reads 8 bytes, so callers keep it off the end
inline uint32_t nibbles8(const uint8_t* codes, int64_t k, int64_t nbytes) {
  uint8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t at = k >> 1;
  const uint8_t* p = codes + at;
  if (at + 8 > nbytes) {
    std::memcpy(buf, p, static_cast<size_t>(nbytes - at));
    p = buf;
  }
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
template <typename S, int BB>
__attribute__((target("avx2,fma,f16c"))) void rows_q4_avx2(const float* x, int64_t K, const uint8_t* mask,
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
      const uint8_t bits = T.rev[m[c8]];
      if (!bits) continue;
      const int64_t g = r * G + (c8 * 8) / gs;
      const __m256i cv = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(nibbles8(codes, k, nbytes))),
                                                            shifts), low4);
      const __m256 wq = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(cv), _mm256_set1_ps(zero ? static_cast<float>(zero[g]) : 8.f)),
                                      _mm256_set1_ps(sc(scale + g)));
      __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T.expand[bits]));
      __m256 on = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(T.lane_on[bits])));
      __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(wq, idx), on);
      k += __builtin_popcount(bits);
      for (int b = 0; b < BB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * K + c8 * 8), acc[b]);
    }
    for (int b = 0; b < BB; ++b) y[b * N + r] = hsum_avx2(acc[b]);
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
  m.def("isa_level", &isa_level, "ISA used for a wanted level (-1: best): 0 scalar, 1 AVX2, 2 AVX-512");
}
