// Shared pieces of the XLA:CPU FFI kernels (smallm_gemm.cc, packed_gemm.cc):
// the NT register-block micro-kernel and the thread-pool work splitter.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace decodax {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------- NT kernel
inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// 4 weight rows (output columns n0..n0+3) for MR rows of x; K % 8 == 0.
template <int MR>
inline void QuadNT(const float* x, int64_t K, const float* w, int64_t N, float* y) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int r = 0; r < MR; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) y[r * N + j] = HSum(acc[r][j]);
}

// One quad of weight rows w[0..3, K] (output columns c..c+3 of y, row stride
// ldy) for all M rows of x; K % 8 == 0. Each output is summed in the same order
// whatever M is, so results never depend on how many rows are multiplied.
inline void QuadAllRowsNT(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) QuadNT<3>(x + m * K, K, w, ldy, y + m * ldy);
  switch (M - m) {
    case 2: QuadNT<2>(x + m * K, K, w, ldy, y + m * ldy); break;
    case 1: QuadNT<1>(x + m * K, K, w, ldy, y + m * ldy); break;
    default: break;
  }
}

// One output column (weight row w[K]) for all M rows, scalar (tails).
inline void ColumnScalarNT(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k];
    y[m * ldy] = s;
  }
}

// ---------------------------------------------------------------- threading
// Column chunks handed out by an atomic counter; the calling thread works too
// and finishes every chunk itself if the pool never runs the scheduled tasks,
// so the call cannot deadlock on a busy pool.
struct Job {
  std::function<void(int64_t, int64_t, int64_t)> run;  // (batch entry, columns [c0, c1))
  int64_t n_cols = 0, chunk = 0, per_batch = 0, n_chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < n_chunks;) {
      int64_t g = i / per_batch, c = (i % per_batch) * chunk;
      run(g, c, std::min(n_cols, c + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kMinParallelWork = 1 << 17;  // multiply-adds; below, waking a thread costs more

inline void RunParallel(ffi::ThreadPool& pool, int64_t batch, int64_t n_cols, int64_t align, int64_t work,
                 std::function<void(int64_t, int64_t, int64_t)> run) {
  int64_t threads = work < kMinParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  // ~4 chunks per thread for balance, aligned to the kernel's column block.
  int64_t per = std::max<int64_t>(1, 4 * threads / batch);
  int64_t chunk = (n_cols + per - 1) / per;
  chunk = std::max<int64_t>(align, (chunk + align - 1) / align * align);
  auto job = std::make_shared<Job>();
  job->run = std::move(run);
  job->n_cols = n_cols;
  job->chunk = chunk;
  job->per_batch = (n_cols + chunk - 1) / chunk;
  job->n_chunks = batch * job->per_batch;
  int64_t helpers = std::min<int64_t>(threads, job->n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) _mm_pause();
}

}  // namespace decodax
