// Batched CholeskyQR2 for CUDA: two passes of (Gram, k x k Cholesky + inverse, panel
// product), the first on the column-scaled and shifted Gram, with a per-layer flag that
// sends a layer to the Householder fallback in bindings.cpp. Torch-free.
//
// Limitation: compile-checked for sm_80 and sm_90 only; it has never run on a GPU. The
// CPU build runs a third pass where this one raises the flag (dev > kMaxDeviation).
#include <cfloat>
#include <cmath>

#include "cuda/launchers.h"
#include "cuda/panel_ops.cuh"

namespace rlora::cuda {
namespace {

using detail::Carver;

constexpr double kMaxDeviation = 0.5;  // largest ||G - I||_F a second pass can finish

template <typename T>
struct Unit;
template <>
struct Unit<float> {
  static constexpr double value = FLT_EPSILON / 2;
};
template <>
struct Unit<double> {
  static constexpr double value = DBL_EPSILON / 2;
};

__global__ void init_kernel(double* racc, int32_t* flags, int64_t L, int k) {
  const int64_t l = blockIdx.x;
  for (int e = threadIdx.x; e < k * k; e += blockDim.x) {
    racc[l * k * k + e] = (e / k == e % k) ? 1.0 : 0.0;
  }
  if (threadIdx.x == 0) flags[l] = 0;
}

/* One CholeskyQR factorisation per layer, from its Gram g [k, k]: with
 * D = diag(sqrt(g_jj)) (or I when !scale: later passes must not inflate a near-null column,
 * see csrc/cpu/small_linalg.h) and D^-1 g D^-1 + shift I = U^T U, writes x = D^-1 U^-1 and
 * racc <- (U D) racc. Flags the layer (and writes x = I) on a zero column, a pivot at or
 * below pivot_floor, or ||g - I||_F > max_dev. grid L, block kMaxWidth: thread c owns
 * column c of every k x k matrix. */
template <typename T>
__global__ void cholqr_factor_kernel(const T* __restrict__ gram, T* __restrict__ x,
                                     double* __restrict__ racc, int32_t* __restrict__ flags,
                                     int k, bool scale, double shift, double pivot_floor,
                                     double max_dev) {
  __shared__ double s[kMaxWidth][kMaxWidth + 1];  // scaled Gram; upper triangle -> U
  __shared__ double d[kMaxWidth];
  __shared__ double colsum[kMaxWidth];
  __shared__ int failed;
  const int64_t l = blockIdx.x;
  const int c = threadIdx.x;
  const T* g = gram + l * k * k;
  T* xl = x + l * k * k;
  double* rl = racc + l * k * k;

  if (c == 0) failed = flags[l];
  __syncthreads();
  if (!failed) {
    double part = 0.0;
    if (c < k) {
      for (int i = 0; i < k; ++i) {
        const double e = static_cast<double>(g[i * k + c]) - (i == c ? 1.0 : 0.0);
        part += e * e;
      }
      const double gcc = static_cast<double>(g[c * k + c]);
      if (!(gcc > 0.0) || !isfinite(gcc)) failed = 1;  // every writer stores 1
      d[c] = scale ? sqrt(gcc) : 1.0;
    }
    colsum[c] = part;
    __syncthreads();
    if (c == 0) {
      double total = 0.0;
      for (int j = 0; j < k; ++j) total += colsum[j];
      if (sqrt(total) > max_dev) failed = 1;
    }
    __syncthreads();
  }
  if (!failed) {
    if (c < k) {
      for (int i = 0; i < k; ++i) {
        s[i][c] = static_cast<double>(g[i * k + c]) / (d[i] * d[c]) + (i == c ? shift : 0.0);
      }
    }
    __syncthreads();
    // Right-looking Cholesky; thread c updates column c of the trailing matrix.
    for (int j = 0; j < k; ++j) {
      if (c == 0) {
        const double piv = s[j][j];
        if (!(piv > pivot_floor) || !isfinite(piv)) {
          failed = 1;
        } else {
          s[j][j] = sqrt(piv);
        }
      }
      __syncthreads();
      if (failed) break;  // uniform: read by every thread after the same barrier
      if (c > j && c < k) s[j][c] /= s[j][j];
      __syncthreads();
      if (c > j && c < k) {
        for (int i = j + 1; i <= c; ++i) s[i][c] -= s[j][i] * s[j][c];
      }
      __syncthreads();
    }
  }
  if (failed) {
    if (c < k) {
      for (int i = 0; i < k; ++i) xl[i * k + c] = T(i == c ? 1 : 0);
    }
    if (c == 0) flags[l] = 1;
    return;
  }
  if (c < k) {
    // Column c of V = U^-1 by back substitution, then x = D^-1 V.
    double v[kMaxWidth];
    for (int i = c; i >= 0; --i) {
      double sum = (i == c) ? 1.0 : 0.0;
      for (int p = i + 1; p <= c; ++p) sum -= s[i][p] * v[p];
      v[i] = sum / s[i][i];
    }
    for (int i = 0; i < k; ++i) xl[i * k + c] = T(i <= c ? v[i] / d[i] : 0.0);
    // Column c of (U D) racc; racc is upper triangular, so rows p > c of column c are 0.
    double rc[kMaxWidth];
    for (int p = 0; p <= c; ++p) rc[p] = rl[p * k + c];
    for (int i = 0; i < k; ++i) {
      double sum = 0.0;
      for (int p = i; p <= c; ++p) sum += s[i][p] * d[p] * rc[p];
      rl[i * k + c] = sum;
    }
  }
}

template <typename T>
__global__ void cast_r_kernel(const double* __restrict__ racc, T* __restrict__ r, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) r[e] = static_cast<T>(racc[e]);
}

struct Buffers {
  void* part;
  void* gram;
  void* x;
  double* racc;
  void* q1;
};

template <typename T>
Buffers carve(void* workspace, int64_t L, int64_t m, int64_t k, size_t* used) {
  Carver cv{static_cast<char*>(workspace)};
  Buffers b;
  b.part = cv.take<T>(static_cast<size_t>(L * detail::n_splits(m) * k * k));
  b.gram = cv.take<T>(static_cast<size_t>(L * k * k));
  b.x = cv.take<T>(static_cast<size_t>(L * k * k));
  b.racc = cv.take<double>(static_cast<size_t>(L * k * k));
  b.q1 = cv.take<T>(static_cast<size_t>(L * m * k));
  *used = cv.used;
  return b;
}

}  // namespace

template <typename T>
size_t cholqr2_workspace_bytes(int64_t L, int64_t m, int64_t k) {
  size_t used = 0;
  carve<T>(nullptr, L, m, k, &used);
  return used;
}

template <typename T>
cudaError_t cholqr2_launch(const T* a, T* q, T* r, int32_t* flags, void* workspace,
                           int64_t L, int64_t m, int64_t k, cudaStream_t stream) {
  if (L == 0 || k == 0) return cudaSuccess;
  if (k > kMaxWidth || m < k) return cudaErrorInvalidValue;
  size_t used = 0;
  const Buffers b = carve<T>(workspace, L, m, k, &used);
  T* part = static_cast<T*>(b.part);
  T* gram = static_cast<T*>(b.gram);
  T* x = static_cast<T*>(b.x);
  T* q1 = static_cast<T*>(b.q1);
  const int ki = static_cast<int>(k);
  const unsigned blocks = static_cast<unsigned>(L);
  const double unit = Unit<T>::value;
  // Same shift and floor as the CPU kernel (csrc/cpu/thin_qr.cpp), for the unit-diagonal
  // Gram: the shift covers the rounding of the Gram and of the Cholesky.
  const double shift = 11.0 * static_cast<double>(m * k + k * (k + 1)) * unit;
  const double floor = static_cast<double>(k) * unit;

  init_kernel<<<blocks, detail::kThreads, 0, stream>>>(b.racc, flags, L, ki);
  detail::cross_gram<T>(a, a, gram, part, L, m, ki, ki, stream);
  cholqr_factor_kernel<T><<<blocks, kMaxWidth, 0, stream>>>(gram, x, b.racc, flags, ki, true,
                                                            shift, floor, HUGE_VAL);
  detail::panel_product<T>(a, x, false, nullptr, nullptr, T(0), q1, L, m, ki, 0, ki, stream);
  detail::cross_gram<T>(q1, q1, gram, part, L, m, ki, ki, stream);
  cholqr_factor_kernel<T><<<blocks, kMaxWidth, 0, stream>>>(gram, x, b.racc, flags, ki, false,
                                                            0.0, floor, kMaxDeviation);
  detail::panel_product<T>(q1, x, false, nullptr, nullptr, T(0), q, L, m, ki, 0, ki, stream);
  const int64_t n = L * k * k;
  cast_r_kernel<T><<<static_cast<unsigned>(detail::ceil_div(n, detail::kThreads)),
                     detail::kThreads, 0, stream>>>(b.racc, r, n);
  return cudaGetLastError();
}

template size_t cholqr2_workspace_bytes<float>(int64_t, int64_t, int64_t);
template size_t cholqr2_workspace_bytes<double>(int64_t, int64_t, int64_t);
template cudaError_t cholqr2_launch<float>(const float*, float*, float*, int32_t*, void*,
                                           int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t cholqr2_launch<double>(const double*, double*, double*, int32_t*, void*,
                                            int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace rlora::cuda
