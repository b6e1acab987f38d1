// Matrix-vector products with blockwise-quantized weights on the CPU, for XLA's
// FFI: y [M, N] float32 = x [M, K] float32 @ W [K, N], W a QuantizedWeight in the
// layout of jaxllm/quant.py (values [N / slices, K] with row-split nibbles, an
// optional plane of high bits, scales and minimums [K / G, N], or float16 scales and
// minimums paired in one uint32 array).
//
// Why native code: XLA:CPU either dequantizes the weight into a float32 buffer
// before its dot (and in a decode loop hoists that out of the loop, so the whole
// model sits in memory in float32), or, written as multiply + reduce, emits a loop
// that runs at half the speed of its float32 dot (benchmarks/NOTES.md). Here each
// weight byte is read once and turned into floats in registers.
//
// Built at first use by jaxllm/kernels/cpu_qmatvec.py with -O3 -march=native. 4- and
// 8-bit weights with groups of 32k use AVX2 intrinsics where the CPU has them; other
// forms a generic loop written as 8-lane arrays for the compiler to vectorize.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define JAXLLM_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;

float HalfToFloat(uint16_t h) {
#ifdef JAXLLM_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

struct Weight {
  const uint8_t* values;  // [N / slices, K]: int8 levels (bits 8) or low nibbles
  const uint8_t* high;    // [N / high_slices, K] or null
  const void* scales;     // [K / G, N], float16 or float32
  const void* mins;       // like scales, or null
  bool half;              // scales and minimums are float16
  int64_t stride;         // 2 where they are float16 pairs (scale, minimum), else 1
  int bits;
  int64_t K, N, G;

  float Scale(const void* table, int64_t g, int64_t n) const {
    const int64_t i = (g * N + n) * stride;
    return half ? HalfToFloat(static_cast<const uint16_t*>(table)[i])
                : static_cast<const float*>(table)[i];
  }
};

// The levels of output row n over inputs [k0, k0 + count) as floats, minus the
// symmetric offset when there are no minimums.
inline void Levels(const Weight& w, int64_t n, int64_t k0, int64_t count, float* out) {
  if (w.bits == 8) {
    const int8_t* v = reinterpret_cast<const int8_t*>(w.values) + n * w.K + k0;
    for (int64_t k = 0; k < count; ++k) out[k] = static_cast<float>(v[k]);
    return;
  }
  const int64_t half_rows = w.N / 2;
  const uint8_t* v = w.values + (n % half_rows) * w.K + k0;
  const int shift = (n / half_rows) * 4;
  uint8_t level[512];
  for (int64_t k = 0; k < count; ++k) level[k] = (v[k] >> shift) & 15;
  if (w.high != nullptr) {
    const int width = w.bits - 4;
    const int64_t rows = w.N / (8 / width);
    const uint8_t* h = w.high + (n % rows) * w.K + k0;
    const int hshift = (n / rows) * width;
    const uint8_t mask = (1 << width) - 1;
    for (int64_t k = 0; k < count; ++k) level[k] |= ((h[k] >> hshift) & mask) << 4;
  }
  const float offset = w.mins != nullptr ? 0.0f : static_cast<float>(1 << (w.bits - 1));
  for (int64_t k = 0; k < count; ++k) out[k] = static_cast<float>(level[k]) - offset;
}

// y[r, n] for rows r < M and the outputs of value rows [v0, v1): one output per
// row for 8 bits, two (n and n + N/2, the nibbles of the same bytes) below.
void Rows(const Weight& w, const float* x, const float* group_sums, int64_t M, int64_t v0,
          int64_t v1, float* y) {
  const int64_t groups = w.K / w.G;
  const int halves = w.bits == 8 ? 1 : 2;
  // Inputs per chunk: whole groups, at most 512 (the level buffer).
  const int64_t per_chunk = std::max<int64_t>(1, 512 / w.G) * w.G;
  alignas(32) float q[512];
  for (int64_t vr = v0; vr < v1; ++vr) {
    float acc[2][4][kLanes] = {};
    float tail[2][4] = {};
    for (int64_t k0 = 0; k0 < w.K; k0 += per_chunk) {
      const int64_t count = std::min(per_chunk, w.K - k0);
      for (int h = 0; h < halves; ++h) {
        const int64_t n = vr + h * (w.N / 2);
        Levels(w, n, k0, count, q);
        for (int64_t g = k0 / w.G; g < (k0 + count) / w.G; ++g) {
          const float s = w.Scale(w.scales, g, n);
          const float* qg = q + (g * w.G - k0);
          for (int64_t r = 0; r < M; ++r) {
            const float* xg = x + r * w.K + g * w.G;
            float part[kLanes] = {};
            int64_t k = 0;
            for (; k + kLanes <= w.G; k += kLanes)
              for (int l = 0; l < kLanes; ++l) part[l] += qg[k + l] * xg[k + l];
            for (; k < w.G; ++k) tail[h][r] += s * qg[k] * xg[k];
            for (int l = 0; l < kLanes; ++l) acc[h][r][l] += s * part[l];
          }
        }
      }
    }
    for (int h = 0; h < halves; ++h) {
      const int64_t n = vr + h * (w.N / 2);
      for (int64_t r = 0; r < M; ++r) {
        float total = tail[h][r];
        for (int l = 0; l < kLanes; ++l) total += acc[h][r][l];
        if (w.mins != nullptr) {  // sum_k x_k m_g(k) = sum_g m_g (sum of x over group g)
          for (int64_t g = 0; g < groups; ++g)
            total += w.Scale(w.mins, g, n) * group_sums[r * groups + g];
        }
        y[r * w.N + n] = total;
      }
    }
  }
}

#ifdef JAXLLM_AVX2

// 16 levels (unsigned bytes, or signed for int8) as two vectors of 8 floats.
template <bool kSigned>
inline void Widen16(__m128i b, __m256& f0, __m256& f1) {
  if (kSigned) {
    f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  } else {
    f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  }
}

// acc[r] += s * (levels of 32 inputs) . x[r, k..k+32)
template <bool kSigned>
inline void Dot32(__m256i levels, const float* x, int64_t K, int64_t M, __m256 s, __m256* acc) {
  __m256 f0, f1, f2, f3;
  Widen16<kSigned>(_mm256_castsi256_si128(levels), f0, f1);
  Widen16<kSigned>(_mm256_extracti128_si256(levels, 1), f2, f3);
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = x + r * K;
    __m256 part = _mm256_mul_ps(f0, _mm256_loadu_ps(xr));
    part = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xr + 8), part);
    part = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xr + 16), part);
    part = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xr + 24), part);
    acc[r] = _mm256_fmadd_ps(s, part, acc[r]);
  }
}

inline float Sum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// Rows for 4-bit (no high plane) and 8-bit weights with groups of a multiple of 32:
// one 32-byte load gives 32 levels of one row (int8) or of two rows (nibbles).
// Symmetric 4-bit levels are used unsigned; their offset of 8 joins the group-sum
// term: sum_k (l_k - 8) s x_k = s (l . x) - 8 s (sum of x over the group).
void RowsAvx2(const Weight& w, const float* x, const float* group_sums, int64_t M, int64_t v0,
              int64_t v1, float* y) {
  const int64_t groups = w.K / w.G;
  const bool nibbles = w.bits == 4;
  const __m256i low4 = _mm256_set1_epi8(15);
  for (int64_t vr = v0; vr < v1; ++vr) {
    __m256 acc[2][4];
    for (auto& half : acc)
      for (auto& a : half) a = _mm256_setzero_ps();
    const uint8_t* v = w.values + vr * w.K;
    const int64_t n_high = vr + w.N / 2;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s0 = _mm256_set1_ps(w.Scale(w.scales, g, vr));
      if (!nibbles) {
        for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 32)
          Dot32<true>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + k)), x + k, w.K, M, s0, acc[0]);
        continue;
      }
      const __m256 s1 = _mm256_set1_ps(w.Scale(w.scales, g, n_high));
      for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 32) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + k));
        Dot32<false>(_mm256_and_si256(b, low4), x + k, w.K, M, s0, acc[0]);
        Dot32<false>(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4), x + k, w.K, M, s1, acc[1]);
      }
    }
    for (int h = 0; h < (nibbles ? 2 : 1); ++h) {
      const int64_t n = h ? n_high : vr;
      for (int64_t r = 0; r < M; ++r) {
        float total = Sum8(acc[h][r]);
        if (w.mins != nullptr) {
          for (int64_t g = 0; g < groups; ++g)
            total += w.Scale(w.mins, g, n) * group_sums[r * groups + g];
        } else if (nibbles) {
          for (int64_t g = 0; g < groups; ++g)
            total -= 8.0f * w.Scale(w.scales, g, n) * group_sums[r * groups + g];
        }
        y[r * w.N + n] = total;
      }
    }
  }
}
#endif

ffi::Error QMatvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values,
                   ffi::AnyBuffer high, ffi::AnyBuffer scales, ffi::AnyBuffer mins,
                   ffi::Result<ffi::Buffer<ffi::F32>> y, int32_t bits, bool has_high,
                   bool has_mins) {
  const auto xd = x.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || sd.size() != 2) return ffi::Error::InvalidArgument("x and scales must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = sd[1];
  if (M > 4) return ffi::Error::InvalidArgument("at most 4 rows");
  if (bits != 8 && (bits < 4 || bits > 6)) return ffi::Error::InvalidArgument("bits must be 4, 5, 6 or 8");
  Weight w;
  w.values = static_cast<const uint8_t*>(values.untyped_data());
  w.high = has_high ? static_cast<const uint8_t*>(high.untyped_data()) : nullptr;
  const bool paired = scales.element_type() == ffi::DataType::U32;
  w.scales = scales.untyped_data();
  w.mins = !has_mins ? nullptr : paired ? static_cast<const uint16_t*>(w.scales) + 1 : mins.untyped_data();
  w.half = paired || scales.element_type() == ffi::DataType::F16;
  w.stride = paired ? 2 : 1;
  w.bits = bits;
  w.K = K;
  w.N = N;
  w.G = K / sd[0];
  // The value rows are cut into chunks that the caller and the pool's threads take
  // from a shared counter. The caller never waits for a helper that has not started
  // (the pool may be busy with other work): it takes whatever chunks are left and
  // then waits only for chunks other threads have taken. A helper that starts late
  // finds none left and touches nothing but the shared state it co-owns.
  struct Shared {
    Weight w;
    const float* x;
    float* y;
    int64_t M, value_rows, chunk, chunks;
    std::vector<float> group_sums;  // [M, K / G]: sums of x over each group
    std::atomic<int64_t> next{0}, done{0};

    void Work() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t v1 = std::min(value_rows, (c + 1) * chunk);
#ifdef JAXLLM_AVX2
        if ((w.bits == 8 || (w.bits == 4 && w.high == nullptr)) && w.G % 32 == 0) {
          RowsAvx2(w, x, group_sums.data(), M, c * chunk, v1, y);
          done.fetch_add(1, std::memory_order_release);
          continue;
        }
#endif
        Rows(w, x, group_sums.data(), M, c * chunk, v1, y);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  Shared& s = *shared;
  s.w = w;
  s.x = x.typed_data();
  s.y = y->typed_data();
  s.M = M;
  s.value_rows = bits == 8 ? N : N / 2;
  s.chunk = 16;
  s.chunks = (s.value_rows + s.chunk - 1) / s.chunk;
  const int64_t groups = K / w.G;
  s.group_sums.assign(M * groups, 0.0f);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t k = 0; k < w.G; ++k) s.group_sums[r * groups + g] += s.x[r * K + g * w.G + k];

  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), cores - 1, s.chunks - 1});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Work(); });
  s.Work();
  while (s.done.load(std::memory_order_acquire) < s.chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatvec, QMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<bool>("has_high")
                                  .Attr<bool>("has_mins"));
