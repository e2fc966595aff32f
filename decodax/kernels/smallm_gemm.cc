// Small-M matrix products for XLA:CPU through the XLA FFI.
//
// Decoding multiplies a handful of rows (the T = 1..16 new tokens of a decode,
// speculative-verify or Jacobi step) by large weight matrices. XLA:CPU runs
// M = 1 as a fast matrix-vector product but M >= 2 through a general GEMM that
// repacks the whole weight matrix on every call, so a verify step of 8 tokens
// costs ~3x a step of 1 although both only need to stream the weights once.
// These kernels stream each weight once, keep a block of outputs (rows x 4
// weight rows for NT, rows x 16 columns for NN) in AVX2 registers and split
// (batch entry, column chunk) work items over XLA's intra-op thread pool.
//
//   SmallmNT: y[g, M, N] = x[g, M, K] @ w[g, N, K]^T  (weights [out, in]; attention q.k)
//   SmallmNN: y[g, M, N] = x[g, M, K] @ w[g, K, N]    (attention p.v)
// w may have batch size 1 (shared weights). The NT form streams contiguous
// weight rows and is the fast one for large weights; NN reads 16-column panels.
#include "gemm_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace decodax;

constexpr int64_t kMR = 4;  // rows per register block

// ---------------------------------------------------------------- NN kernel
// One panel of 16 output columns for MR rows: acc[r] += x[r, k] * w[k, c0:c0+16].
// x rows have stride ldx; only k < K is summed (the live part of a KV cache).
template <int MR>
inline void PanelNN(const float* x, int64_t ldx, int64_t K, const float* w, int64_t N, float* y) {
  __m256 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * N;
    _mm_prefetch(reinterpret_cast<const char*>(wk + 8 * N), _MM_HINT_T0);
    __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
    for (int r = 0; r < MR; ++r) {
      __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      a0[r] = _mm256_fmadd_ps(xb, w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(xb, w1, a1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(y + r * N, a0[r]);
    _mm256_storeu_ps(y + r * N + 8, a1[r]);
  }
}

// Columns [c0, c1) of y for all M rows (c0, c1 multiples of 16 except a scalar
// tail), summing over k < live only.
void ColumnsNN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
               int64_t c0, int64_t c1, int64_t live) {
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    int64_t m = 0;
    for (; m + kMR <= M; m += kMR) PanelNN<kMR>(x + m * K, K, live, w + c, N, y + m * N + c);
    switch (M - m) {
      case 3: PanelNN<3>(x + m * K, K, live, w + c, N, y + m * N + c); break;
      case 2: PanelNN<2>(x + m * K, K, live, w + c, N, y + m * N + c); break;
      case 1: PanelNN<1>(x + m * K, K, live, w + c, N, y + m * N + c); break;
      default: break;
    }
  }
  for (; c < c1; ++c) {
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < live; ++k) s += x[m * K + k] * w[k * N + c];
      y[m * N + c] = s;
    }
  }
}

// Columns [c0, min(c1, live)) of y; columns from live on are set to zero.
void ColumnsNT(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
               int64_t c0, int64_t c1, int64_t live) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t z = std::max(c0, live); z < c1; ++z) y[m * N + z] = 0.f;
  c1 = std::min(c1, live);
  int64_t c = c0;
  if (K % 8 == 0)
    for (; c + 4 <= c1; c += 4) QuadAllRowsNT(x, M, K, w + c * K, y + c, N);
  for (; c < c1; ++c) ColumnScalarNT(x, M, K, w + c * K, y + c, N);
}

// y[g] = x[g] @ w[g]^T (kTransposed) or x[g] @ w[g] for every batch entry g; a
// leading batch dimension of size 1 on w is shared by all g (weights).
template <bool kTransposed>
ffi::Error SmallmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x_any, ffi::AnyBuffer w_any,
                      ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::AnyBuffer> y_any,
                      int64_t w_index, int64_t group) {
  // w is [G|1, ., .] or [L, G|1, ., .] of which entry w_index is used (one
  // layer of a stacked KV cache, without slicing it out first). Batch entry g
  // only uses the first lengths[g / group] rows of its w (the committed cache
  // slots): NT leaves later output columns zero, NN sums over them only.
  auto xd = x_any.dimensions(), wd_all = w_any.dimensions();
  if (x_any.element_type() != ffi::F32 || w_any.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("smallm: float32 operands only");
  if (xd.size() != 3 || (wd_all.size() != 3 && wd_all.size() != 4))
    return ffi::Error::InvalidArgument("smallm: x must be 3-D and w 3-D or 4-D");
  const bool stacked = wd_all.size() == 4;
  if (stacked && (w_index < 0 || w_index >= wd_all[0]))
    return ffi::Error::InvalidArgument("smallm: w_index out of range");
  const int64_t wd[3] = {wd_all[stacked], wd_all[stacked + 1], wd_all[stacked + 2]};
  int64_t G = xd[0], M = xd[1], K = xd[2];
  int64_t N = kTransposed ? wd[1] : wd[2];
  if ((kTransposed ? wd[2] : wd[1]) != K) return ffi::Error::InvalidArgument("smallm: inner dimensions differ");
  if (wd[0] != G && wd[0] != 1) return ffi::Error::InvalidArgument("smallm: batch dimensions differ");
  if (group < 1 || lengths.element_count() * group < G)
    return ffi::Error::InvalidArgument("smallm: lengths do not cover the batch");
  const int32_t* len = lengths.typed_data();
  const int64_t w_stride = wd[0] == 1 ? 0 : K * N;
  const float* xp = static_cast<const float*>(x_any.untyped_data());
  const float* wp = static_cast<const float*>(w_any.untyped_data()) +
                    (stacked ? w_index * wd[0] * wd[1] * wd[2] : 0);
  float* yp = static_cast<float*>(y_any->untyped_data());
  if (G == 0 || M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + G * M * N, 0.f);
    return ffi::Error::Success();
  }
  // Work items: (batch entry, column chunk) flattened to one column range of G * N.
  const int64_t align = kTransposed ? 4 : 16;
  RunParallel(pool, G, N, align, G * M * N * K, [=](int64_t g, int64_t c0, int64_t c1) {
    const float* xg = xp + g * M * K;
    const float* wg = wp + g * w_stride;
    float* yg = yp + g * M * N;
    const int64_t live = std::clamp<int64_t>(len[g / group], 0, kTransposed ? N : K);
    if (kTransposed) {
      ColumnsNT(xg, wg, yg, M, K, N, c0, c1, live);
    } else {
      ColumnsNN(xg, wg, yg, M, K, N, c0, c1, live);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define DECODAX_SMALLM_HANDLER(name, transposed)                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, SmallmImpl<transposed>,             \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::AnyBuffer>()                \
                                    .Arg<ffi::AnyBuffer>()                \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Ret<ffi::AnyBuffer>()                \
                                    .Attr<int64_t>("w_index")             \
                                    .Attr<int64_t>("group"));

DECODAX_SMALLM_HANDLER(SmallmNT, true)
DECODAX_SMALLM_HANDLER(SmallmNN, false)
