// Fused tangent projection for CUDA (METHOD.md sec. 2, ProjectLR):
//   Ad = P W - A_L C,  Bd = Q (A_L^T P)^T,  W = Q^T B_R,  C = (A_L^T P) W
// as two row reductions, one tiny r x r product and two row-tiled panel products; the
// subtraction happens inside the Ad product, so no m x k temporary exists. Torch-free.
//
// Limitation: compile-checked for sm_80 and sm_90 only; it has never run on a GPU.
#include "cuda/launchers.h"
#include "cuda/panel_ops.cuh"

namespace rlora::cuda {
namespace {

using detail::Carver;

// out[l] = a[l] b[l] for a [L, n1, n2], b [L, n2, n3]; grid L, block kThreads.
template <typename T>
__global__ void small_product_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                     T* __restrict__ out, int n1, int n2, int n3) {
  const int64_t l = blockIdx.x;
  const T* al = a + l * n1 * n2;
  const T* bl = b + l * n2 * n3;
  for (int e = threadIdx.x; e < n1 * n3; e += blockDim.x) {
    const int i = e / n3, j = e % n3;
    T sum = T(0);
    for (int p = 0; p < n2; ++p) sum += al[i * n2 + p] * bl[p * n3 + j];
    out[l * n1 * n3 + e] = sum;
  }
}

struct Buffers {
  void* part;
  void* atp;  // A_L^T P   [L, r, k]
  void* w;    // Q^T B_R   [L, k, r]
  void* c;    // atp w     [L, r, r]
};

template <typename T>
Buffers carve(void* workspace, int64_t L, int64_t m, int64_t n, int64_t r, int64_t k,
              size_t* used) {
  Carver cv{static_cast<char*>(workspace)};
  const int64_t splits = detail::n_splits(m) > detail::n_splits(n) ? detail::n_splits(m)
                                                                   : detail::n_splits(n);
  Buffers b;
  b.part = cv.take<T>(static_cast<size_t>(L * splits * r * k));
  b.atp = cv.take<T>(static_cast<size_t>(L * r * k));
  b.w = cv.take<T>(static_cast<size_t>(L * k * r));
  b.c = cv.take<T>(static_cast<size_t>(L * r * r));
  *used = cv.used;
  return b;
}

}  // namespace

template <typename T>
size_t project_lr_workspace_bytes(int64_t L, int64_t m, int64_t n, int64_t r, int64_t k) {
  size_t used = 0;
  carve<T>(nullptr, L, m, n, r, k, &used);
  return used;
}

template <typename T>
cudaError_t project_lr_launch(const T* a_l, const T* b_r, const T* p, const T* q, T* ad,
                              T* bd, void* workspace, int64_t L, int64_t m, int64_t n,
                              int64_t r, int64_t k, cudaStream_t stream) {
  if (L == 0 || r == 0) return cudaSuccess;
  if (r > kMaxWidth || k > kMaxWidth) return cudaErrorInvalidValue;
  size_t used = 0;
  const Buffers b = carve<T>(workspace, L, m, n, r, k, &used);
  T* part = static_cast<T*>(b.part);
  T* atp = static_cast<T*>(b.atp);
  T* w = static_cast<T*>(b.w);
  T* c = static_cast<T*>(b.c);
  const int ri = static_cast<int>(r), ki = static_cast<int>(k);

  detail::cross_gram<T>(a_l, p, atp, part, L, m, ri, ki, stream);
  detail::cross_gram<T>(q, b_r, w, part, L, n, ki, ri, stream);
  small_product_kernel<T><<<static_cast<unsigned>(L), detail::kThreads, 0, stream>>>(
      atp, w, c, ri, ki, ri);
  detail::panel_product<T>(p, w, false, a_l, c, T(-1), ad, L, m, ki, ri, ri, stream);
  detail::panel_product<T>(q, atp, true, nullptr, nullptr, T(0), bd, L, n, ki, 0, ri, stream);
  return cudaGetLastError();
}

template size_t project_lr_workspace_bytes<float>(int64_t, int64_t, int64_t, int64_t, int64_t);
template size_t project_lr_workspace_bytes<double>(int64_t, int64_t, int64_t, int64_t,
                                                   int64_t);
template cudaError_t project_lr_launch<float>(const float*, const float*, const float*,
                                              const float*, float*, float*, void*, int64_t,
                                              int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t project_lr_launch<double>(const double*, const double*, const double*,
                                               const double*, double*, double*, void*, int64_t,
                                               int64_t, int64_t, int64_t, int64_t,
                                               cudaStream_t);

}  // namespace rlora::cuda
