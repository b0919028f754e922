// Per-layer k x k kernels of the batched CholeskyQR: scaled (shifted) Cholesky, the
// triangular inverse that turns a panel product into the orthonormal factor, and the
// running R factor. Torch-free: plain row-major arrays, accumulated in double.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__GNUC__)
#define RLORA_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define RLORA_ALWAYS_INLINE inline
#endif

namespace rlora::small {

enum PassStatus : int8_t {
  kOk = 0,
  kZeroColumn = 1,  // a column of the panel is zero or not finite: no Cholesky exists
  kBreakdown = 2,   // a pivot fell below the floor: the panel is numerically rank-deficient
};

/* One CholeskyQR pass of one layer, from the Gram matrix of its current panel A.
 *
 *   gram         [k, k] row-major, G = A^T A
 *   scale        use D = diag(sqrt(G_jj)), else D = I
 *   shift        added to the scaled Gram D^-1 G D^-1 before the Cholesky
 *   pivot_floor  smallest accepted Cholesky pivot of that (shifted) Gram
 *
 * With D^-1 G D^-1 + shift I = U^T U (U upper, positive diagonal) it writes
 *   x    [k, k] row-major: D^-1 U^-1, so that A x has (nearly) orthonormal columns,
 *   r    [k, k] row-major, updated in place: r <- (U D) r, the running R factor,
 *   dev  ||G - I||_F: how far A already was from orthonormal,
 * and returns kOk. work holds 3 k^2 + k doubles.
 *
 * Scaling the columns in the first pass makes it blind to column norms: a panel such as
 * [-lr * Ad, A_L] (lr ~ 1e-4) is as easy as [Ad, A_L]. Later passes must not scale: there
 * a column far shorter than 1 means the first pass met a (numerically) dependent column,
 * and scaling would blow its rounding noise up into a plausible direction.
 * x = D^-1 U^-1 is applied as a plain matrix product instead of a triangular solve.
 * NOTE (384 x 32 panels, cond(A) swept 1e1..1e12, csrc/cpu/thin_qr.cpp's 2-3 passes):
 * ||Q^T Q - I||_max <= 1e-6 and ||A - QR|| / ||A|| <= 7e-7 in float32 (Householder: 1e-6,
 * 1e-6) up to cond 1e4, Householder fallback from ~1e5; float64 stays at 2e-15 / 6e-15 with
 * CholeskyQR up to cond 1e12.
 *
 * K > 0 fixes k at compile time. Every inner loop runs over whole rows (0..k) so it has a
 * fixed trip count and vectorises; the triangular bounds would leave ~k^2 / 2 loops of a
 * few elements each, whose overhead dominated.
 * Always inlined, so a caller compiled for a wider ISA (target_clones in thin_qr.cpp)
 * gets these loops in that ISA.
 */
template <typename scalar_t, int K = 0>
RLORA_ALWAYS_INLINE PassStatus cholqr_factor(const scalar_t* __restrict gram,
                                             int64_t k_runtime, bool scale, double shift,
                                             double pivot_floor, scalar_t* __restrict x,
                                             double* __restrict r, double* dev, double* work) {
  const int64_t k = K > 0 ? K : k_runtime;
  double* __restrict s = work;              // scaled Gram; its upper triangle becomes U
  double* __restrict v = work + k * k;      // U^-1
  double* __restrict tmp = work + 2 * k * k;
  double* __restrict inv_d = work + 3 * k * k;  // 1 / column norms

  double dsum = 0.0;
  for (int64_t i = 0; i < k * k; ++i) {
    const double e = static_cast<double>(gram[i]);
    dsum += e * e;
  }
  for (int64_t j = 0; j < k; ++j) {
    const double gjj = static_cast<double>(gram[j * k + j]);
    if (!(gjj > 0.0) || !std::isfinite(gjj)) return kZeroColumn;
    dsum += 1.0 - 2.0 * gjj;  // ||G - I||^2 = ||G||^2 - 2 tr(G) + k
    inv_d[j] = scale ? 1.0 / std::sqrt(gjj) : 1.0;
  }
  *dev = std::sqrt(std::fmax(dsum, 0.0));
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      s[i * k + j] = static_cast<double>(gram[i * k + j]) * inv_d[i] * inv_d[j];
    }
    s[i * k + i] += shift;
  }

  // Right-looking Cholesky S = U^T U over whole rows. Entries left of the diagonal turn
  // into junk that is never read: updates of row i only read row j < i at columns >= i.
  for (int64_t j = 0; j < k; ++j) {
    double* uj = s + j * k;
    const double piv = uj[j];
    if (!(piv > pivot_floor) || !std::isfinite(piv)) return kBreakdown;
    const double ujj = std::sqrt(piv);
    const double inv = 1.0 / ujj;
    for (int64_t c = 0; c < k; ++c) uj[c] *= inv;
    uj[j] = ujj;
    for (int64_t i = j + 1; i < k; ++i) {
      const double f = uj[i];
      double* si = s + i * k;
      for (int64_t c = 0; c < k; ++c) si[c] -= f * uj[c];
    }
  }

  // V = U^-1 row by row from the bottom: row i = (e_i - sum_{p>i} U_ip V_p) / U_ii. Rows
  // of V are zero left of the diagonal, so whole-row updates keep them so.
  for (int64_t i = k - 1; i >= 0; --i) {
    double* vi = v + i * k;
    for (int64_t c = 0; c < k; ++c) vi[c] = 0.0;
    vi[i] = 1.0;
    const double* ui = s + i * k;
    for (int64_t p = i + 1; p < k; ++p) {
      const double f = ui[p];
      const double* vp = v + p * k;
      for (int64_t c = 0; c < k; ++c) vi[c] -= f * vp[c];
    }
    const double inv = inv_d[i] / ui[i];  // x = D^-1 V folded in: row i of x is row i / d_i
    for (int64_t c = 0; c < k; ++c) x[i * k + c] = static_cast<scalar_t>(vi[c] * inv);
    const double inv_u = 1.0 / ui[i];
    for (int64_t c = 0; c < k; ++c) vi[c] *= inv_u;
  }

  // r <- (U D) r; both factors upper triangular, so is the product.
  for (int64_t i = 0; i < k; ++i) {
    double* ti = tmp + i * k;
    for (int64_t c = 0; c < k; ++c) ti[c] = 0.0;
    const double* ui = s + i * k;
    for (int64_t p = i; p < k; ++p) {
      const double f = ui[p] / inv_d[p];
      const double* rp = r + p * k;
      for (int64_t c = 0; c < k; ++c) ti[c] += f * rp[c];
    }
  }
  for (int64_t i = 0; i < k * k; ++i) r[i] = tmp[i];
  return kOk;
}

// cholqr_factor with k fixed at compile time for the panel widths 2r of ranks 4..32.
template <typename scalar_t>
RLORA_ALWAYS_INLINE PassStatus cholqr_factor_any(const scalar_t* gram, int64_t k, bool scale,
                                                 double shift, double pivot_floor, scalar_t* x,
                                                 double* r, double* dev, double* work) {
#define RLORA_FACTOR(K) \
  cholqr_factor<scalar_t, K>(gram, k, scale, shift, pivot_floor, x, r, dev, work)
  switch (k) {
    case 8: return RLORA_FACTOR(8);
    case 16: return RLORA_FACTOR(16);
    case 32: return RLORA_FACTOR(32);
    case 64: return RLORA_FACTOR(64);
    default: return RLORA_FACTOR(0);
  }
#undef RLORA_FACTOR
}

template <typename scalar_t>
void set_identity(scalar_t* x, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t c = 0; c < k; ++c) x[i * k + c] = static_cast<scalar_t>(i == c ? 1 : 0);
  }
}

}  // namespace rlora::small
