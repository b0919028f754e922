// Plain launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch types,
// so nvcc compile-checks them anywhere and csrc/cuda/bindings.cpp binds them to torch.
// All tensors are row-major, contiguous and stacked over a leading layer dimension L.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace rlora::cuda {

// Widest panel (k) and largest rank the shared-memory kernels take. The bindings send
// wider problems to torch's own (cuSOLVER / cuBLAS) path.
constexpr int kMaxWidth = 64;

/* Batched CholeskyQR2 of panels a [L, m, k] (m >= k, k <= kMaxWidth):
 * q [L, m, k] with orthonormal columns, r [L, k, k] upper triangular with diag(r) > 0.
 * The first pass works on the column-scaled, shifted Gram; the second re-orthogonalises.
 * flags [L]: set to 1 where a layer needs the Householder fallback (zero or non-finite
 * column, Cholesky breakdown, or a first pass too far from orthonormal for a second one
 * to finish); q and r of such a layer are meaningless.
 * workspace: cholqr2_workspace_bytes(...) bytes of device memory. */
template <typename T>
size_t cholqr2_workspace_bytes(int64_t L, int64_t m, int64_t k);

template <typename T>
cudaError_t cholqr2_launch(const T* a, T* q, T* r, int32_t* flags, void* workspace,
                           int64_t L, int64_t m, int64_t k, cudaStream_t stream);

/* Fused tangent projection of P Q^T at the point (A_L, B_R) (r, k <= kMaxWidth):
 *   Ad = P W - A_L ((A_L^T P) W),  Bd = Q (A_L^T P)^T,  W = Q^T B_R
 * a_l [L, m, r], b_r [L, n, r], p [L, m, k], q [L, n, k] -> ad [L, m, r], bd [L, n, r].
 * Four kernels (two reductions, two row-tiled products); no m x k temporary. */
template <typename T>
size_t project_lr_workspace_bytes(int64_t L, int64_t m, int64_t n, int64_t r, int64_t k);

template <typename T>
cudaError_t project_lr_launch(const T* a_l, const T* b_r, const T* p, const T* q, T* ad,
                              T* bd, void* workspace, int64_t L, int64_t m, int64_t n,
                              int64_t r, int64_t k, cudaStream_t stream);

}  // namespace rlora::cuda
