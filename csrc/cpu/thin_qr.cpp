// Batched thin QR of tall-skinny panels on the CPU: column-scaled, shifted CholeskyQR2
// (a third pass where the second one starts from a poorly orthogonal panel), Householder
// for the layers where Cholesky breaks down. Also the thread-parallel Householder and
// small SVD that the retraction core uses.
//
// NOTE (Xeon AVX-512, torch 2.13 CPU + MKL, one thread, CPU time, float32, r = 16):
// each pass is two batched GEMMs (Gram, panel times k x k) plus ~6 us of k x k work per
// layer, where torch's geqrf + orgqr runs layer by layer at BLAS-2 speed. Measured
// [24, 384, 32]: 1.19 ms vs 1.73 ms (1.45x); [6, 1536, 32]: 0.75 vs 1.82 ms (2.4x);
// [6, 384, 32]: 0.31 vs 0.43 ms (1.4x). Panels that need the third pass (the retraction's
// [B_R, B - lr Bd] in float32) cost about as much as Householder. Whole table:
// benchmarks/bench_cpu_compiled.py.
#include "cpu/kernels.h"
#include "cpu/small_linalg.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace rlora {
namespace cpu {
namespace {

// A pass that leaves ||Q^T Q - I||_F above this starts the next pass from a panel whose
// condition number may exceed sqrt(3); one more pass (or Householder) is then needed.
constexpr double kMaxDeviation = 0.5;

// Input bytes of one chunk of layers in for_layer_chunks. The chunk's temporaries take a
// few times as much, so half of a 2 MB per-core L2. Smaller chunks pay the ~5 us per ATen
// call more often: chunks of 2 retraction layers (512 KB of working set) cost 1.7 ms more
// per 24-layer bucket than one call.
constexpr int64_t kChunkBytes = 1024 * 1024;

// The k x k work per layer is ~k^3 / 2 multiply-adds in short loops over rows; built for
// baseline x86-64 it runs in SSE2 at 2 doubles per instruction. target_clones adds AVX2 and
// AVX-512 copies picked at load time by the CPU (GCC function multi-versioning, Linux).
// NOTE (callgrind, k = 32, one pass): 162k instructions for baseline x86-64, 64k for the
// haswell (AVX2 + FMA) copy; whole rows instead of triangular loops already saved ~30% at
// k = 16 (fixed trip counts vectorise; ~k^2 / 2 loops of a few elements did not).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RLORA_ISA_CLONES \
  __attribute__((target_clones("default", "arch=haswell", "arch=skylake-avx512")))
#else
#define RLORA_ISA_CLONES
#endif

RLORA_ISA_CLONES small::PassStatus factor_one(const float* g, int64_t k, bool scale, double shift,
                                              double floor, float* x, double* r, double* dev,
                                              double* work) {
  return small::cholqr_factor_any<float>(g, k, scale, shift, floor, x, r, dev, work);
}

RLORA_ISA_CLONES small::PassStatus factor_one(const double* g, int64_t k, bool scale, double shift,
                                              double floor, double* x, double* r, double* dev,
                                              double* work) {
  return small::cholqr_factor_any<double>(g, k, scale, shift, floor, x, r, dev, work);
}

int64_t factor_grain(int64_t k) {
  // Each chunk should carry ~50k flops of k x k work so OpenMP start-up stays negligible.
  const int64_t per_layer = std::max<int64_t>(1, k * k * k);
  return std::max<int64_t>(1, 50000 / per_layer);
}

// Factors every layer of one pass. layer_of maps a sub-batch row to its layer (nullptr:
// the identity); failed layers get x = I so later products leave their panel alone. The
// first pass (scale = true) also starts the running R factor at I.
template <typename scalar_t>
void factor_pass(const Tensor& gram, Tensor& x, double* racc, double* dev, uint8_t* failed,
                 const int64_t* layer_of, bool scale, double shift, double pivot_floor) {
  const int64_t n = gram.size(0), k = gram.size(1);
  const scalar_t* g = gram.const_data_ptr<scalar_t>();
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, n, factor_grain(k), [&](int64_t begin, int64_t end) {
    std::vector<double> work(3 * k * k + k);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = layer_of ? layer_of[i] : i;
      scalar_t* xi = xp + i * k * k;
      if (scale) small::set_identity(racc + l * k * k, k);
      if (!failed[l]) {
        const auto st = factor_one(g + i * k * k, k, scale, shift, pivot_floor, xi,
                                   racc + l * k * k, dev + l, work.data());
        if (st == small::kOk) continue;
        failed[l] = 1;
      }
      small::set_identity(xi, k);
    }
  });
}

// CholeskyQR2 (3 passes where the second starts too far from orthonormal) into q and r;
// fills path and marks in `failed` the layers left to Householder.
template <typename scalar_t>
void cholqr(const Tensor& a, Tensor& q, Tensor& r, int8_t* path, std::vector<uint8_t>& failed) {
  const int64_t n_layers = a.size(0), m = a.size(1), k = a.size(2);
  const double unit = std::numeric_limits<scalar_t>::epsilon() / 2;
  // Shift of the first pass (shifted CholeskyQR, Fukaya et al. 2020) for the column-scaled
  // Gram, whose entries are bounded by 1: it covers the rounding of the Gram product and
  // of the Cholesky, so the first pass cannot break down on a full-rank panel.
  const double shift = 11.0 * static_cast<double>(m * k + k * (k + 1)) * unit;
  const double pivot_floor = static_cast<double>(k) * unit;

  Tensor racc = at::empty({n_layers, k, k}, a.options().dtype(at::kDouble));
  std::vector<double> dev(n_layers, 0.0);
  double* rp = racc.mutable_data_ptr<double>();
  Tensor x = at::empty({n_layers, k, k}, a.options());

  Tensor gram = at::bmm(a.mT(), a);
  factor_pass<scalar_t>(gram, x, rp, dev.data(), failed.data(), nullptr, true, shift,
                        pivot_floor);
  Tensor q1 = at::bmm(a, x);
  at::bmm_out(gram, q1.mT(), q1);
  factor_pass<scalar_t>(gram, x, rp, dev.data(), failed.data(), nullptr, false, 0.0,
                        pivot_floor);
  at::bmm_out(q, q1, x);

  std::vector<int64_t> redo;
  for (int64_t l = 0; l < n_layers; ++l) {
    if (!failed[l] && dev[l] > kMaxDeviation) redo.push_back(l);
  }
  if (!redo.empty()) {
    // Retraction panels such as [B_R, B - lr Bd] often send every layer here: then skip
    // the gather and scatter.
    const int64_t n_redo = static_cast<int64_t>(redo.size());
    const bool all = n_redo == n_layers;
    Tensor idx = all ? Tensor() : at::from_blob(redo.data(), {n_redo}, at::kLong).clone();
    const Tensor sub = all ? q : q.index_select(0, idx);
    const Tensor sub_gram = all ? at::bmm_out(gram, sub.mT(), sub) : at::bmm(sub.mT(), sub);
    Tensor sub_x = at::empty({n_redo, k, k}, a.options());
    factor_pass<scalar_t>(sub_gram, sub_x, rp, dev.data(), failed.data(),
                          all ? nullptr : redo.data(), false, 0.0, pivot_floor);
    if (all) {
      at::bmm_out(q1, sub, sub_x);  // q1 is free again
      q.copy_(q1);
    } else {
      q.index_copy_(0, idx, at::bmm(sub, sub_x));
    }
    for (const int64_t l : redo) {
      if (dev[l] > kMaxDeviation) failed[l] = 1;  // the third pass started ill-conditioned
      path[l] = kPathCholQR3;
    }
  }
  r.copy_(racc);
}

// thin QR of the layers of a into q, r and path (slices of the outputs).
template <typename scalar_t>
void cholqr_into(const Tensor& a, Tensor q, Tensor r, int8_t* pp) {
  const int64_t n_layers = a.size(0);
  std::vector<uint8_t> failed(n_layers, 0);
  cholqr<scalar_t>(a, q, r, pp, failed);

  std::vector<int64_t> fallback;
  for (int64_t l = 0; l < n_layers; ++l) {
    if (failed[l]) fallback.push_back(l);
  }
  if (!fallback.empty()) {
    const int64_t n_fb = static_cast<int64_t>(fallback.size());
    Tensor idx = at::from_blob(fallback.data(), {n_fb}, at::kLong).clone();
    auto [qh, rh] = householder_qr(a.index_select(0, idx));
    q.index_copy_(0, idx, qh);
    r.index_copy_(0, idx, rh);
    for (const int64_t l : fallback) pp[l] = kPathHouseholder;
  }
}

}  // namespace

void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = at::get_num_threads();
  if (n <= 1 || threads <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  // Worker threads must see the caller's grad and inference modes: the chunks call ATen.
  const at::ThreadLocalState state;
  at::parallel_for(0, n, (n + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    fn(begin, end);
  });
}

void for_layer_chunks(int64_t n_layers, int64_t bytes_per_layer,
                      const std::function<void(int64_t, int64_t)>& fn) {
  if (n_layers <= 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads == 1) {
    // One thread: one call over the bucket. Chunking then only adds calls (measured ~5%
    // slower on the MiniLM buckets, within noise) and there is no second core to feed.
    fn(0, n_layers);
    return;
  }
  int64_t chunks = std::max<int64_t>(1, (n_layers * bytes_per_layer) / kChunkBytes);
  chunks = std::min(n_layers, (chunks + threads - 1) / threads * threads);  // even shares
  const int64_t size = (n_layers + chunks - 1) / chunks;
  chunks = (n_layers + size - 1) / size;
  if (chunks == 1) {
    for (int64_t c = 0; c < chunks; ++c) fn(c * size, std::min(n_layers, (c + 1) * size));
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = begin; c < end; ++c) fn(c * size, std::min(n_layers, (c + 1) * size));
  });
}

std::tuple<Tensor, Tensor> householder_qr(const Tensor& a) {
  Tensor q = at::empty(a.sizes(), a.options());
  Tensor r = at::empty({a.size(0), a.size(2), a.size(2)}, a.options());
  parallel_chunks(a.size(0), [&](int64_t begin, int64_t end) {
    auto [qq, rr] = at::linalg_qr(a.narrow(0, begin, end - begin), "reduced");
    Tensor sign = at::sign(rr.diagonal(0, -2, -1));
    sign.masked_fill_(sign == 0, 1);
    Tensor q_out = q.narrow(0, begin, end - begin);
    Tensor r_out = r.narrow(0, begin, end - begin);
    at::mul_out(q_out, qq, sign.unsqueeze(-2));
    at::mul_out(r_out, rr, sign.unsqueeze(-1));
  });
  return {q, r};
}

std::tuple<Tensor, Tensor, Tensor> batched_svd(const Tensor& core) {
  // torch loops over the batch on one thread (~0.1 ms per 32 x 32 gesdd); the layers are
  // independent, so each thread takes a slice.
  const int64_t n = core.size(0), k = core.size(-1);
  Tensor u = at::empty({n, k, k}, core.options());
  Tensor s = at::empty({n, k}, core.options());
  Tensor vh = at::empty({n, k, k}, core.options());
  parallel_chunks(n, [&](int64_t begin, int64_t end) {
    auto [uu, ss, vv] = at::linalg_svd(core.narrow(0, begin, end - begin), false);
    u.narrow(0, begin, end - begin).copy_(uu);
    s.narrow(0, begin, end - begin).copy_(ss);
    vh.narrow(0, begin, end - begin).copy_(vv);
  });
  return {u, s, vh};
}

std::tuple<Tensor, Tensor, Tensor> thin_qr_ex(const Tensor& a_in, int64_t method) {
  check_panels("thin_qr", {&a_in});
  TORCH_CHECK(a_in.size(1) >= a_in.size(2), "rlora_C::thin_qr: panels must be tall (m >= k), "
              "got ", a_in.sizes());
  TORCH_CHECK(method == kMethodAuto || method == kMethodHouseholder,
              "rlora_C::thin_qr_ex: method must be 0 (auto) or 1 (Householder), got ", method);
  const Tensor a = a_in.detach().contiguous();
  const int64_t n_layers = a.size(0), k = a.size(2);
  Tensor path = at::full({n_layers}, kPathCholQR2, a.options().dtype(at::kChar));
  if (n_layers == 0 || k == 0 || method == kMethodHouseholder) {
    auto [q, r] = householder_qr(a);
    path.fill_(kPathHouseholder);
    return {q, r, path};
  }
  Tensor q = at::empty(a.sizes(), a.options());
  Tensor r = at::empty({n_layers, k, k}, a.options());
  int8_t* pp = path.mutable_data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rlora_C::thin_qr", [&] {
    const int64_t bytes = a.size(1) * k * static_cast<int64_t>(sizeof(scalar_t));
    for_layer_chunks(n_layers, bytes, [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      cholqr_into<scalar_t>(a.narrow(0, begin, n), q.narrow(0, begin, n),
                            r.narrow(0, begin, n), pp + begin);
    });
  });
  return {q, r, path};
}

std::tuple<Tensor, Tensor> thin_qr(const Tensor& a) {
  auto [q, r, path] = thin_qr_ex(a, kMethodAuto);
  return {q, r};
}

}  // namespace cpu

void check_panels(const char* op, std::initializer_list<const Tensor*> tensors) {
  const Tensor& first = **tensors.begin();
  for (const Tensor* t : tensors) {
    TORCH_CHECK(t->dim() == 3, "rlora_C::", op, ": expected [L, rows, cols] tensors, got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
                "rlora_C::", op, ": float32 or float64 only (cast half types up first), got ",
                t->scalar_type());
    TORCH_CHECK(t->scalar_type() == first.scalar_type() && t->device() == first.device(),
                "rlora_C::", op, ": inputs must share dtype and device");
    TORCH_CHECK(t->size(0) == first.size(0), "rlora_C::", op, ": layer counts differ");
  }
}

TORCH_LIBRARY_IMPL(rlora_C, CPU, m) {
  m.impl("thin_qr", &cpu::thin_qr);
  m.impl("thin_qr_ex", &cpu::thin_qr_ex);
}

}  // namespace rlora
