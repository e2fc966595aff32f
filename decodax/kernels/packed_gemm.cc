// y[M, N] = x[M, K] @ W^T with W [N, K] kept in GGUF block format (XLA:CPU FFI).
//
// One decode step of a 135M-parameter model streams every weight once; as
// float32 that is ~540 MB per token and the step is bound by memory bandwidth.
// GGUF files store the weights in blocks of 32 (Q4_1: 4-bit codes with a scale
// d and a minimum m per block; Q8_0: 8-bit codes with a scale d), ~5x fewer
// bytes. These kernels dequantize four weight rows at a time into an L1-sized
// buffer -- w = fma(d, q, m) in float32, bit for bit the value
// gguf.quants.dequantize produces (d * q is exact in float32) -- and multiply
// them with the float32 micro-kernel of smallm_gemm.cc (for one row of Q4_1,
// which is compute-bound, the dequantized vectors go straight into the
// accumulators in the same order). So the packed product is bitwise equal to
// the float32 small-M product on the dequantized matrix, and, like it,
// independent of M.
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

// The 32 weights of block b of one row as 4 float32 vectors.
struct Q41 {
  const uint8_t* q;   // [rows, K/2]
  const float* dm;    // [rows, nb, 2]
  int64_t nb;
  static constexpr bool kFuseOneRow = true;  // compute-bound: skip the buffer for M = 1
  inline void Block(int64_t row, int64_t b, __m256 out[4]) const {
    const int64_t i = row * nb + b;
    const __m256 d = _mm256_broadcast_ss(dm + 2 * i), m = _mm256_broadcast_ss(dm + 2 * i + 1);
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * i));
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j) out[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), m);
  }
};

struct Q80 {
  const int8_t* q;    // [rows, K]
  const float* d;     // [rows, nb, 1]
  int64_t nb;
  static constexpr bool kFuseOneRow = false;  // bandwidth-bound: row-sequential reads are faster
  inline void Block(int64_t row, int64_t b, __m256 out[4]) const {
    const int64_t i = row * nb + b;
    const __m256 dv = _mm256_broadcast_ss(d + i);
    for (int j = 0; j < 4; ++j) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + kBlock * i + 8 * j));
      out[j] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
    }
  }
};

// Dequantize one weight row into out[nb * 32].
template <class Codes>
inline void DequantRow(const Codes& c, int64_t row, float* out) {
  __m256 v[4];
  for (int64_t b = 0; b < c.nb; ++b) {
    c.Block(row, b, v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + kBlock * b + 8 * j, v[j]);
  }
}

// One row of x times four weight rows, dequantized in registers: the same
// accumulation order as QuadNT<1> on the dequantized rows (acc[j] over k in
// steps of 8), so the result is bitwise that of the buffered path.
template <class Codes>
inline void QuadOneRow(const Codes& c, int64_t row0, const float* x, float* y) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 w[4];
  for (int64_t b = 0; b < c.nb; ++b) {
    __m256 xv[4];
    for (int s = 0; s < 4; ++s) xv[s] = _mm256_loadu_ps(x + kBlock * b + 8 * s);
    for (int j = 0; j < 4; ++j) {
      c.Block(row0 + j, b, w);
      for (int s = 0; s < 4; ++s) acc[j] = _mm256_fmadd_ps(xv[s], w[s], acc[j]);
    }
  }
  for (int j = 0; j < 4; ++j) y[j] = HSum(acc[j]);
}

template <class Codes>
void ColumnsPacked(const Codes& c, const float* x, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t c0, int64_t c1) {
  thread_local std::vector<float> buf;
  buf.resize(4 * K);
  int64_t col = c0;
  for (; col + 4 <= c1; col += 4) {
    if (Codes::kFuseOneRow && M == 1) {
      QuadOneRow(c, col, x, y + col);
      continue;
    }
    for (int j = 0; j < 4; ++j) DequantRow(c, col + j, buf.data() + j * K);
    QuadAllRowsNT(x, M, K, buf.data(), y + col, N);
  }
  for (; col < c1; ++col) {
    DequantRow(c, col, buf.data());
    ColumnScalarNT(x, M, K, buf.data(), y + col, N);
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
  RunParallel(pool, 1, N, 4, M * N * K + N * K, [=](int64_t, int64_t c0, int64_t c1) {
    if (q41) {
      ColumnsPacked(Q41{qp, sp, nb}, xp, yp, M, K, N, c0, c1);
    } else {
      ColumnsPacked(Q80{reinterpret_cast<const int8_t*>(qp), sp, nb}, xp, yp, M, K, N, c0, c1);
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
