// y[M, N] = x[M, K] @ W^T with W [N, K] kept in GGUF block format (XLA:CPU FFI).
//
// One decode step of a 135M-parameter model streams every weight once; as
// float32 that is ~540 MB per token and the step is bound by memory bandwidth.
// GGUF files store the weights in blocks of 32 (Q4_1: 4-bit codes with a scale
// d and a minimum m per block; Q8_0: 8-bit codes with a scale d), ~5x fewer
// bytes. These kernels dequantize four weight rows at a time into an L1-sized
// buffer -- w = fma(d, q, m) in float32, bit for bit the value
// gguf.quants.dequantize produces (d * q is exact in float32) -- and multiply
// them with the float32 micro-kernel of smallm_gemm.cc. So the packed product
// is bitwise equal to the float32 small-M product on the dequantized matrix,
// and, like it, independent of M.
//
//   PackedNT: x f32 [M, K]; q u8 [N, K/2] (Q4_1: byte j of a block holds codes
//             j (low nibble) and j + 16 (high nibble)) or s8 [N, K] (Q8_0);
//             scales f32 [N, K/32, 2] (d, m) or [N, K/32, 1] (d); y f32 [M, N].
#include <vector>

#include "gemm_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace decodax;

constexpr int64_t kBlock = 32;

// Dequantize one Q4_1 weight row (nb blocks) into out[nb * 32].
inline void RowQ41(const uint8_t* q, const float* dm, int64_t nb, float* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 d = _mm256_broadcast_ss(dm + 2 * b), m = _mm256_broadcast_ss(dm + 2 * b + 1);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * b));
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j) {
      __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
      _mm256_storeu_ps(out + kBlock * b + 8 * j, _mm256_fmadd_ps(d, code, m));
    }
  }
}

// Dequantize one Q8_0 weight row into out[nb * 32].
inline void RowQ80(const int8_t* q, const float* d_all, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 d = _mm256_broadcast_ss(d_all + b);
    for (int j = 0; j < 4; ++j) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + kBlock * b + 8 * j));
      __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
      _mm256_storeu_ps(out + kBlock * b + 8 * j, _mm256_mul_ps(d, code));
    }
  }
}

ffi::Error PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                      ffi::Buffer<ffi::F32> scales, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scales.dimensions();
  const bool q41 = q.element_type() == ffi::U8;
  if (!q41 && q.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("packed: codes must be uint8 (Q4_1) or int8 (Q8_0)");
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 3)
    return ffi::Error::InvalidArgument("packed: x must be [M, K], q [N, .], scales [N, K/32, .]");
  const int64_t M = xd[0], K = xd[1], N = qd[0], nb = K / kBlock;
  if (K % kBlock || qd[1] != (q41 ? K / 2 : K) || sd[0] != N || sd[1] != nb || sd[2] != (q41 ? 2 : 1))
    return ffi::Error::InvalidArgument("packed: operand shapes do not match");
  const float* xp = x.typed_data();
  const uint8_t* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scales.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t row_bytes = q41 ? K / 2 : K, row_scales = nb * (q41 ? 2 : 1);
  RunParallel(pool, 1, N, 4, M * N * K + N * K, [=](int64_t, int64_t c0, int64_t c1) {
    thread_local std::vector<float> buf;
    buf.resize(4 * K);
    auto dequant = [&](int64_t row, float* out) {
      if (q41) {
        RowQ41(qp + row * row_bytes, sp + row * row_scales, nb, out);
      } else {
        RowQ80(reinterpret_cast<const int8_t*>(qp) + row * row_bytes, sp + row * row_scales, nb, out);
      }
    };
    int64_t c = c0;
    for (; c + 4 <= c1; c += 4) {
      for (int j = 0; j < 4; ++j) dequant(c + j, buf.data() + j * K);
      QuadAllRowsNT(xp, M, K, buf.data(), yp + c, N);
    }
    for (; c < c1; ++c) {
      dequant(c, buf.data());
      ColumnScalarNT(xp, M, K, buf.data(), yp + c, N);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedNT, PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
