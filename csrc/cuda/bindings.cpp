// CUDA implementations of the rlora_C ops: the torch side of the launchers in csrc/cuda
// (checks, allocation, stream, Householder fallback for flagged layers). Built only when
// torch has CUDA and a toolkit exists (setup.py, CMakeLists.txt).
//
// Limitation: compiled and registered only in a CUDA build, which this project's CI
// machines cannot make (CPU torch); nothing here has run on a GPU yet.
#include "cpu/kernels.h"
#include "cuda/launchers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace rlora {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "rlora_C::", op, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor> householder_cuda(const Tensor& a) {
  auto [q, r] = at::linalg_qr(a, "reduced");
  Tensor sign = at::sign(r.diagonal(0, -2, -1));
  sign.masked_fill_(sign == 0, 1);
  return {q * sign.unsqueeze(-2), r * sign.unsqueeze(-1)};
}

std::tuple<Tensor, Tensor, Tensor> thin_qr_ex_cuda(const Tensor& a_in, int64_t method) {
  check_panels("thin_qr", {&a_in});
  TORCH_CHECK(a_in.size(1) >= a_in.size(2), "rlora_C::thin_qr: panels must be tall (m >= k), "
              "got ", a_in.sizes());
  TORCH_CHECK(method == kMethodAuto || method == kMethodHouseholder,
              "rlora_C::thin_qr_ex: method must be 0 (auto) or 1 (Householder), got ", method);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = a_in.detach().contiguous();
  const int64_t n_layers = a.size(0), m = a.size(1), k = a.size(2);
  if (n_layers == 0 || k == 0 || method == kMethodHouseholder || k > cuda::kMaxWidth) {
    auto [q, r] = householder_cuda(a);
    return {q, r, at::full({n_layers}, kPathHouseholder, a.options().dtype(at::kChar))};
  }
  Tensor q = at::empty(a.sizes(), a.options());
  Tensor r = at::empty({n_layers, k, k}, a.options());
  Tensor flags = at::empty({n_layers}, a.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rlora_C::thin_qr", [&] {
    Tensor ws = workspace(cuda::cholqr2_workspace_bytes<scalar_t>(n_layers, m, k), a);
    check_launch(cuda::cholqr2_launch<scalar_t>(
                     a.const_data_ptr<scalar_t>(), q.mutable_data_ptr<scalar_t>(),
                     r.mutable_data_ptr<scalar_t>(), flags.mutable_data_ptr<int32_t>(),
                     ws.mutable_data_ptr(), n_layers, m, k, stream),
                 "thin_qr");
  });
  // One device-to-host copy per call decides whether any layer needs Householder.
  const Tensor bad = flags.nonzero().squeeze(1);
  if (bad.numel() > 0) {
    auto [qh, rh] = householder_cuda(a.index_select(0, bad));
    q.index_copy_(0, bad, qh);
    r.index_copy_(0, bad, rh);
  }
  Tensor path = at::where(flags != 0, at::full({}, kPathHouseholder, flags.options()),
                          at::full({}, kPathCholQR2, flags.options()));
  return {q, r, path.to(at::kChar)};
}

std::tuple<Tensor, Tensor> thin_qr_cuda(const Tensor& a) {
  auto [q, r, path] = thin_qr_ex_cuda(a, kMethodAuto);
  return {q, r};
}

std::tuple<Tensor, Tensor> project_cuda(const Tensor& a_l_in, const Tensor& b_r_in,
                                        const Tensor& p_in, const Tensor& q_in) {
  check_panels("project_lr", {&a_l_in, &b_r_in, &p_in, &q_in});
  const int64_t r = a_l_in.size(2), k = p_in.size(2);
  if (r > cuda::kMaxWidth || k > cuda::kMaxWidth) {
    return project_core(a_l_in.detach(), b_r_in.detach(), p_in.detach(), q_in.detach());
  }
  TORCH_CHECK(a_l_in.size(1) == p_in.size(1) && b_r_in.size(1) == q_in.size(1) &&
                  b_r_in.size(2) == r && q_in.size(2) == k,
              "rlora_C::project_lr: shapes do not chain: a_l ", a_l_in.sizes(), ", b_r ",
              b_r_in.sizes(), ", p ", p_in.sizes(), ", q ", q_in.sizes());
  const c10::cuda::CUDAGuard guard(p_in.device());
  const Tensor a_l = a_l_in.detach().contiguous(), b_r = b_r_in.detach().contiguous();
  const Tensor p = p_in.detach().contiguous(), q = q_in.detach().contiguous();
  const int64_t n_layers = p.size(0), m = p.size(1), n = q.size(1);
  Tensor ad = at::empty(a_l.sizes(), p.options());
  Tensor bd = at::empty(b_r.sizes(), p.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "rlora_C::project_lr", [&] {
    Tensor ws = workspace(cuda::project_lr_workspace_bytes<scalar_t>(n_layers, m, n, r, k), p);
    check_launch(cuda::project_lr_launch<scalar_t>(
                     a_l.const_data_ptr<scalar_t>(), b_r.const_data_ptr<scalar_t>(),
                     p.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                     ad.mutable_data_ptr<scalar_t>(), bd.mutable_data_ptr<scalar_t>(),
                     ws.mutable_data_ptr(), n_layers, m, n, r, k, stream),
                 "project_lr");
  });
  return {ad, bd};
}

std::tuple<Tensor, Tensor, Tensor> svd_cuda(const Tensor& core) {
  return at::linalg_svd(core, false);
}

std::tuple<Tensor, Tensor, Tensor> retract_cuda(const Tensor& left, const Tensor& right,
                                                int64_t rank) {
  const c10::cuda::CUDAGuard guard(left.device());
  return retract_core(left.detach(), right.detach(), rank, &thin_qr_cuda, &svd_cuda);
}

std::tuple<Tensor, Tensor> ortho_cuda(const Tensor& ad, const Tensor& bd, const Tensor& a_l,
                                      const Tensor& b_r, double eps) {
  const c10::cuda::CUDAGuard guard(ad.device());
  return ortho_core(ad.detach(), bd.detach(), a_l.detach(), b_r.detach(), eps, &thin_qr_cuda,
                    &svd_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlora_C, CUDA, m) {
  m.impl("thin_qr", &thin_qr_cuda);
  m.impl("thin_qr_ex", &thin_qr_ex_cuda);
  m.impl("project_lr", &project_cuda);
  m.impl("retract_lr", &retract_cuda);
  m.impl("ortho_lr", &ortho_cuda);
}

}  // namespace rlora
