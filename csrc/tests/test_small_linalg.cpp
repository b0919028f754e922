// Torch-free check of the per-layer CholeskyQR factor (csrc/cpu/small_linalg.h), built and
// run by CMake (ctest): two passes on a panel with scaled columns must give Q^T Q = I and
// A = Q R to a few unit roundoffs, and a zero column must be reported, not factored.
#include "cpu/small_linalg.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using rlora::small::cholqr_factor_any;



template <typename T>
std::vector<T> gram(const std::vector<T>& a, int m, int k) {
  std::vector<T> g(k * k, T(0));
  for (int t = 0; t < m; ++t)
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j) g[i * k + j] += a[t * k + i] * a[t * k + j];
  return g;
}

template <typename T>
std::vector<T> times(const std::vector<T>& a, const std::vector<T>& x, int m, int k) {
  std::vector<T> out(m * k, T(0));
  for (int t = 0; t < m; ++t)
    for (int p = 0; p < k; ++p)
      for (int j = 0; j < k; ++j) out[t * k + j] += a[t * k + p] * x[p * k + j];
  return out;
}

template <typename T>
int check(const char* name, double tol) {
  const int m = 129, k = 10;
  std::mt19937 gen(7);
  std::normal_distribution<double> normal;
  std::vector<T> a(m * k);
  for (int t = 0; t < m; ++t)
    for (int j = 0; j < k; ++j) a[t * k + j] = T(normal(gen) * (j < k / 2 ? 1e-4 : 1.0));
  std::vector<double> r(k * k, 0.0), work(3 * k * k + k);
  for (int i = 0; i < k; ++i) r[i * k + i] = 1.0;
  std::vector<T> x(k * k), q = a;
  double dev = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    const double shift = pass == 0 ? 1e-3 : 0.0;
    const std::vector<T> g = gram(q, m, k);
    if (cholqr_factor_any<T>(g.data(), k, pass == 0, shift, 1e-12, x.data(), r.data(), &dev,
                             work.data()) != rlora::small::kOk) {
      std::printf("%s: unexpected breakdown in pass %d\n", name, pass + 1);
      return 1;
    }
    q = times(q, x, m, k);
  }
  double orth = 0.0, resid = 0.0, norm = 0.0;
  const std::vector<T> g = gram(q, m, k);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) orth = std::fmax(orth, std::fabs(g[i * k + j] - (i == j)));
  for (int t = 0; t < m; ++t)
    for (int j = 0; j < k; ++j) {
      double s = 0.0;
      for (int p = 0; p <= j; ++p) s += double(q[t * k + p]) * r[p * k + j];
      resid = std::fmax(resid, std::fabs(s - a[t * k + j]) / (j < k / 2 ? 1e-4 : 1.0));
      norm = std::fmax(norm, std::fabs(a[t * k + j]));
    }
  std::vector<T> zero(m * k, T(0));
  const std::vector<T> g0 = gram(zero, m, k);
  const auto st = cholqr_factor_any<T>(g0.data(), k, true, 0.0, 1e-12, x.data(), r.data(), &dev,
                                       work.data());
  const bool ok = orth <= tol && resid <= tol * 10 && st == rlora::small::kZeroColumn;
  std::printf("%s: |Q^T Q - I| %.2e, column-relative |A - QR| %.2e, zero panel %s: %s\n",
              name, orth, resid, st == rlora::small::kZeroColumn ? "reported" : "MISSED",
              ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main() { return check<float>("float32", 1e-5) + check<double>("float64", 1e-13); }
