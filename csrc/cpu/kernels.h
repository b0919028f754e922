// Entry points of the CPU kernels, shared by the op registrations and by the CUDA
// bindings (which reuse the device-generic retraction core).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

namespace rlora {

using at::Tensor;

// Values of thin_qr_ex's `method` and of its per-layer `path` output.
constexpr int64_t kMethodAuto = 0;         // CholeskyQR2 (3 passes if needed), else Householder
constexpr int64_t kMethodHouseholder = 1;  // Householder only (torch's geqrf), the safe path
constexpr int8_t kPathHouseholder = -1;
constexpr int8_t kPathCholQR2 = 2;
constexpr int8_t kPathCholQR3 = 3;

namespace cpu {

// Batched thin QR of [L, m, k] panels, diag(R) >= 0; path [L] int8 says how each layer
// was factored. float32 and float64.
std::tuple<Tensor, Tensor, Tensor> thin_qr_ex(const Tensor& a, int64_t method);
std::tuple<Tensor, Tensor> thin_qr(const Tensor& a);

// Householder QR with the sign convention diag(R) >= 0, layers split across threads.
std::tuple<Tensor, Tensor> householder_qr(const Tensor& a);

// Batched SVD of square cores [L, k, k], layers split across threads.
std::tuple<Tensor, Tensor, Tensor> batched_svd(const Tensor& core);

// Runs fn(begin, end) on contiguous chunks of [0, n), one chunk per intra-op thread.
void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// Runs fn(begin, end) on chunks of layers whose inputs (bytes_per_layer each) and
// temporaries stay in a core's L2 cache, spread over the intra-op threads, each thread
// running whole pipelines on its chunks with no barrier between the products. With one
// thread it calls fn(0, n_layers) once.
void for_layer_chunks(int64_t n_layers, int64_t bytes_per_layer,
                      const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu

// Device-generic cores of the retraction and the orthogonalisation: the thin QR and the
// small SVD are passed in, so the CPU and CUDA registrations share one composition.
using QrFn = std::function<std::tuple<Tensor, Tensor>(const Tensor&)>;
using SvdFn = std::function<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>;

std::tuple<Tensor, Tensor, Tensor> retract_core(const Tensor& left, const Tensor& right,
                                                int64_t rank, const QrFn& qr,
                                                const SvdFn& svd);
std::tuple<Tensor, Tensor> ortho_core(const Tensor& ad, const Tensor& bd, const Tensor& a_l,
                                      const Tensor& b_r, double eps, const QrFn& qr,
                                      const SvdFn& svd);
std::tuple<Tensor, Tensor> project_core(const Tensor& a_l, const Tensor& b_r,
                                        const Tensor& p, const Tensor& q);

// Shape and dtype checks shared by every backend's registration.
void check_panels(const char* op, std::initializer_list<const Tensor*> tensors);

}  // namespace rlora
