// Device building blocks shared by the CUDA launchers: the reduction X^T Y over the rows of
// two tall panels, row-tiled products of a panel with small k x k' matrices, and the
// workspace carving. Deterministic: no atomics, partial sums are added in a fixed order.
//
// Limitation: written for correctness and shape coverage, not tuned; no GPU was available
// where they were written, so they have only been compile-checked (sm_80, sm_90), never
// run. Verify them against the reference on a GPU (python_tests/test_compiled.py, marker
// gpu) before relying on their speed.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/launchers.h"

namespace rlora::cuda::detail {

constexpr int kThreads = 256;
constexpr int kTileRows = 32;
constexpr int kMaxEntries = kMaxWidth * kMaxWidth / kThreads;  // Gram entries per thread
constexpr int kMaxSplits = 16;  // row chunks per layer in a reduction
constexpr int64_t kMinChunk = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row chunks a reduction over `rows` rows is split into (one block each).
inline int64_t n_splits(int64_t rows) {
  const int64_t chunk = rows / kMaxSplits > kMinChunk ? ceil_div(rows, kMaxSplits) : kMinChunk;
  const int64_t s = ceil_div(rows, chunk);
  return s > 0 ? s : 1;
}

// Bump allocator over the caller's workspace; every piece 256-byte aligned.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename U>
  U* take(size_t count) {
    used = (used + 255) / 256 * 256;
    U* p = base != nullptr ? reinterpret_cast<U*>(base + used) : nullptr;  // null: sizing only
    used += count * sizeof(U);
    return p;
  }
};

/* Partial cross-Gram: part[l, s] = X[l, rows of chunk s]^T Y[l, same rows].
 * x [L, rows, kx], y [L, rows, ky], part [L, S, kx, ky]; grid (S, L), block kThreads.
 * Each thread owns up to kMaxEntries output entries; row tiles are staged in shared
 * memory so global reads stay coalesced. */
template <typename T>
__global__ void cross_gram_partial_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                          T* __restrict__ part, int64_t rows, int kx, int ky,
                                          int64_t chunk) {
  __shared__ T xs[kTileRows][kMaxWidth];
  __shared__ T ys[kTileRows][kMaxWidth];
  const int64_t l = blockIdx.y;
  const int64_t s = blockIdx.x;
  const T* xl = x + l * rows * kx;
  const T* yl = y + l * rows * ky;
  const int64_t begin = s * chunk;
  const int64_t end = begin + chunk < rows ? begin + chunk : rows;
  const int n_entries = kx * ky;

  T acc[kMaxEntries];
#pragma unroll
  for (int i = 0; i < kMaxEntries; ++i) acc[i] = T(0);

  for (int64_t t0 = begin; t0 < end; t0 += kTileRows) {
    const int tile = end - t0 < kTileRows ? static_cast<int>(end - t0) : kTileRows;
    for (int e = threadIdx.x; e < tile * kx; e += blockDim.x) {
      xs[e / kx][e % kx] = xl[(t0 + e / kx) * kx + e % kx];
    }
    for (int e = threadIdx.x; e < tile * ky; e += blockDim.x) {
      ys[e / ky][e % ky] = yl[(t0 + e / ky) * ky + e % ky];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxEntries; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < n_entries) {
        const int a = e / ky, b = e % ky;
        T sum = acc[i];
        for (int t = 0; t < tile; ++t) sum += xs[t][a] * ys[t][b];
        acc[i] = sum;
      }
    }
    __syncthreads();
  }
  T* out = part + (l * gridDim.x + s) * n_entries;
#pragma unroll
  for (int i = 0; i < kMaxEntries; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e < n_entries) out[e] = acc[i];
  }
}

// out[l] = sum over s of part[l, s], in order s = 0, 1, ...; grid L, block kThreads.
template <typename T>
__global__ void reduce_partials_kernel(const T* __restrict__ part, T* __restrict__ out,
                                       int n_splits, int n_entries) {
  const int64_t l = blockIdx.x;
  for (int e = threadIdx.x; e < n_entries; e += blockDim.x) {
    T sum = T(0);
    for (int s = 0; s < n_splits; ++s) sum += part[(l * n_splits + s) * n_entries + e];
    out[l * n_entries + e] = sum;
  }
}

// out [L, kx, ky] = X^T Y over all rows; `part` holds L * n_splits(rows) * kx * ky values.
template <typename T>
void cross_gram(const T* x, const T* y, T* out, T* part, int64_t L, int64_t rows, int kx,
                int ky, cudaStream_t stream) {
  const int64_t splits = n_splits(rows);
  const int64_t chunk = ceil_div(rows, splits);
  T* dst = splits == 1 ? out : part;
  cross_gram_partial_kernel<T><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(L)),
                                 kThreads, 0, stream>>>(x, y, dst, rows, kx, ky, chunk);
  if (splits > 1) {
    reduce_partials_kernel<T><<<static_cast<unsigned>(L), kThreads, 0, stream>>>(
        part, out, static_cast<int>(splits), kx * ky);
  }
}

/* out[l] = X[l] W[l] + alpha * Y[l] C[l] (the second term only when y != nullptr).
 * x [L, rows, kx]; w [L, kx, kout], or stored transposed [L, kout, kx] when w_transposed;
 * y [L, rows, ky]; c [L, ky, kout]; out [L, rows, kout].
 * grid (ceil(rows / kTileRows), L), block kThreads. The small factors are read through the
 * cache; the panel rows are staged in shared memory. */
template <typename T>
__global__ void panel_product_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                     bool w_transposed, const T* __restrict__ y,
                                     const T* __restrict__ c, T alpha, T* __restrict__ out,
                                     int64_t rows, int kx, int ky, int kout) {
  __shared__ T xs[kTileRows][kMaxWidth];
  __shared__ T ys[kTileRows][kMaxWidth];
  const int64_t l = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int tile = rows - t0 < kTileRows ? static_cast<int>(rows - t0) : kTileRows;
  const T* xl = x + (l * rows + t0) * kx;
  for (int e = threadIdx.x; e < tile * kx; e += blockDim.x) xs[e / kx][e % kx] = xl[e];
  if (y != nullptr) {
    const T* yl = y + (l * rows + t0) * ky;
    for (int e = threadIdx.x; e < tile * ky; e += blockDim.x) ys[e / ky][e % ky] = yl[e];
  }
  __syncthreads();
  const T* wl = w + l * kx * kout;
  const T* cl = y != nullptr ? c + l * ky * kout : nullptr;
  T* ol = out + (l * rows + t0) * kout;
  for (int e = threadIdx.x; e < tile * kout; e += blockDim.x) {
    const int t = e / kout, col = e % kout;
    T sum = T(0);
    for (int p = 0; p < kx; ++p) {
      sum += xs[t][p] * (w_transposed ? wl[col * kx + p] : wl[p * kout + col]);
    }
    if (y != nullptr) {
      T second = T(0);
      for (int p = 0; p < ky; ++p) second += ys[t][p] * cl[p * kout + col];
      sum += alpha * second;
    }
    ol[e] = sum;
  }
}

template <typename T>
void panel_product(const T* x, const T* w, bool w_transposed, const T* y, const T* c, T alpha,
                   T* out, int64_t L, int64_t rows, int kx, int ky, int kout,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kTileRows)), static_cast<unsigned>(L));
  panel_product_kernel<T><<<grid, kThreads, 0, stream>>>(x, w, w_transposed, y, c, alpha, out,
                                                         rows, kx, ky, kout);
}

}  // namespace rlora::cuda::detail
