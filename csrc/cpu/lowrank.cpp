// Tangent projection, retraction and orthogonalisation of the fixed-rank manifold, written
// once over batched products; the thin QR and the small SVD come in as functions so the
// CPU and CUDA registrations share the composition (formulas in docs METHOD.md, sec. 2).
#include "cpu/kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace rlora {

namespace {

void check_project(const Tensor& a_l, const Tensor& b_r, const Tensor& p, const Tensor& q) {
  check_panels("project_lr", {&a_l, &b_r, &p, &q});
  TORCH_CHECK(a_l.size(1) == p.size(1) && b_r.size(1) == q.size(1) &&
                  a_l.size(2) == b_r.size(2) && p.size(2) == q.size(2),
              "rlora_C::project_lr: shapes do not chain: a_l ", a_l.sizes(), ", b_r ",
              b_r.sizes(), ", p ", p.sizes(), ", q ", q.sizes());
}

void check_retract(const Tensor& left, const Tensor& right, int64_t rank) {
  check_panels("retract_lr", {&left, &right});
  const int64_t k = left.size(2);
  TORCH_CHECK(right.size(2) == k, "rlora_C::retract_lr: left and right widths differ");
  TORCH_CHECK(rank >= 1 && rank <= k && k <= std::min(left.size(1), right.size(1)),
              "rlora_C::retract_lr: need 1 <= rank <= width <= min(m, n), got rank ", rank,
              ", left ", left.sizes(), ", right ", right.sizes());
}

void check_ortho(const Tensor& ad, const Tensor& bd, const Tensor& a_l, const Tensor& b_r,
                 double eps) {
  check_panels("ortho_lr", {&ad, &bd, &a_l, &b_r});
  TORCH_CHECK(ad.sizes() == a_l.sizes() && bd.sizes() == b_r.sizes(),
              "rlora_C::ortho_lr: ad must match a_l and bd must match b_r, got ", ad.sizes(),
              ", ", a_l.sizes(), ", ", bd.sizes(), ", ", b_r.sizes());
  TORCH_CHECK(2 * ad.size(2) <= std::min(ad.size(1), bd.size(1)),
              "rlora_C::ortho_lr: 2r must not exceed min(m, n)");
  TORCH_CHECK(eps >= 0, "rlora_C::ortho_lr: eps must be >= 0, got ", eps);
}

}  // namespace

std::tuple<Tensor, Tensor> project_core(const Tensor& a_l, const Tensor& b_r, const Tensor& p,
                                        const Tensor& q) {
  // Ad = P W - A_L (A_L^T P) W with W = Q^T B_R, Bd = Q (P^T A_L): reassociated so that no
  // m x k temporary is formed, and the subtraction rides on the GEMM (beta = 1).
  check_project(a_l, b_r, p, q);
  const Tensor atp = at::bmm(a_l.mT(), p);  // [L, r, k]
  const Tensor w = at::bmm(q.mT(), b_r);    // [L, k, r]
  Tensor ad = at::bmm(p, w);
  ad.baddbmm_(a_l, at::bmm(atp, w), 1, -1);
  Tensor bd = at::bmm(q, atp.mT());
  return {ad, bd};
}

namespace {

// QR of both factors of L R^T and the SVD of the small core T_L T_R^T.
struct CoreSvd {
  Tensor q_l, u, s, q_r, v;
};

CoreSvd core_svd(const Tensor& left, const Tensor& right, const QrFn& qr, const SvdFn& svd) {
  auto [q_l, t_l] = qr(left);
  auto [q_r, t_r] = qr(right);
  auto [u, s, vh] = svd(at::bmm(t_l, t_r.mT()));
  return {q_l, u, s, q_r, vh.mT()};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> retract_core(const Tensor& left, const Tensor& right,
                                                int64_t rank, const QrFn& qr,
                                                const SvdFn& svd) {
  check_retract(left, right, rank);
  const CoreSvd c = core_svd(left, right, qr, svd);
  Tensor a_l = at::bmm(c.q_l, c.u.narrow(2, 0, rank));
  Tensor b_r = at::bmm(c.q_r, c.v.narrow(2, 0, rank));
  Tensor b = b_r * c.s.narrow(1, 0, rank).unsqueeze(1);
  return {a_l, b, b_r};
}

std::tuple<Tensor, Tensor> ortho_core(const Tensor& ad, const Tensor& bd, const Tensor& a_l,
                                      const Tensor& b_r, double eps, const QrFn& qr,
                                      const SvdFn& svd) {
  check_ortho(ad, bd, a_l, b_r, eps);
  const CoreSvd c = core_svd(at::cat({ad, a_l}, -1), at::cat({b_r, bd}, -1), qr, svd);
  // Singular values below eps * s_max become 0 instead of 1: the mask goes on the small
  // k x k factor, not on the m x k result.
  const Tensor keep = c.s > c.s.narrow(1, 0, 1) * eps;
  Tensor p = at::bmm(c.q_l, c.u * keep.unsqueeze(1).to(c.u.scalar_type()));
  Tensor q = at::bmm(c.q_r, c.v);
  return {p, q};
}

namespace {

// The retraction and the orthogonalisation run chunk by chunk of layers on the CPU (see
// cpu::for_layer_chunks), each chunk's results copied into the whole-bucket outputs.
Tensor out_like(const Tensor& t, int64_t cols) {
  return at::empty({t.size(0), t.size(1), cols}, t.options());
}

int64_t elem(const Tensor& t) { return static_cast<int64_t>(t.element_size()); }

void put(const Tensor& out, int64_t begin, const Tensor& part) {
  out.narrow(0, begin, part.size(0)).copy_(part);
}

std::tuple<Tensor, Tensor, Tensor> retract_cpu(const Tensor& left_in, const Tensor& right_in,
                                               int64_t rank) {
  const Tensor left = left_in.detach(), right = right_in.detach();
  check_retract(left, right, rank);
  Tensor a_l = out_like(left, rank), b = out_like(right, rank), b_r = out_like(right, rank);
  const int64_t bytes = (left.size(1) + right.size(1)) * left.size(2) * elem(left);
  cpu::for_layer_chunks(left.size(0), bytes, [&](int64_t begin, int64_t end) {
    auto [x, y, z] = retract_core(left.narrow(0, begin, end - begin),
                                  right.narrow(0, begin, end - begin), rank, &cpu::thin_qr,
                                  &cpu::batched_svd);
    put(a_l, begin, x);
    put(b, begin, y);
    put(b_r, begin, z);
  });
  return {a_l, b, b_r};
}

std::tuple<Tensor, Tensor> ortho_cpu(const Tensor& ad_in, const Tensor& bd_in,
                                     const Tensor& a_l_in, const Tensor& b_r_in, double eps) {
  const Tensor ad = ad_in.detach(), bd = bd_in.detach();
  const Tensor a_l = a_l_in.detach(), b_r = b_r_in.detach();
  check_ortho(ad, bd, a_l, b_r, eps);
  const int64_t k = 2 * ad.size(2);
  Tensor p = out_like(ad, k), q = out_like(bd, k);
  const int64_t bytes = (ad.size(1) + bd.size(1)) * k * elem(ad);
  cpu::for_layer_chunks(ad.size(0), bytes, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    auto [x, y] = ortho_core(ad.narrow(0, begin, n), bd.narrow(0, begin, n),
                             a_l.narrow(0, begin, n), b_r.narrow(0, begin, n), eps,
                             &cpu::thin_qr, &cpu::batched_svd);
    put(p, begin, x);
    put(q, begin, y);
  });
  return {p, q};
}

std::tuple<Tensor, Tensor> project_cpu(const Tensor& a_l, const Tensor& b_r, const Tensor& p,
                                       const Tensor& q) {
  // NOTE (1 thread, CPU time, float32, MiniLM buckets summed): one call over the bucket
  // took 0.87 / 1.30 ms at r = 8 / 16 against 1.06 / 1.64 ms chunk by chunk; the products
  // are too light for the cache to pay back the extra calls.
  return project_core(a_l.detach(), b_r.detach(), p.detach(), q.detach());
}

}  // namespace

TORCH_LIBRARY_IMPL(rlora_C, CPU, m) {
  m.impl("project_lr", &project_cpu);
  m.impl("retract_lr", &retract_cpu);
  m.impl("ortho_lr", &ortho_cpu);
}

}  // namespace rlora
