// The pseudo-inverse methods on the CPU: pinv_solve_one (weighting_spectral.h) and the weights of IMTL-G
// (mgs_kernels/weighting/imtl_g.py) and ConFIG (config.py) built on it, one module per thread.
#include "weighting_spectral.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mgs_weighting.h"
#include "weighting_dense.h"

namespace mgs_weighting {

void pinv_solve_one(const double* A, const uint8_t* present, const double* x, int64_t T, double input_eps,
                    const JacobiSchedule& schedule, double* out, uint8_t* converged, int64_t* rank,
                    PinvScratch& scratch) {
  const size_t T_ = static_cast<size_t>(T);
  double* L = scratch.L.data();
  double* y = scratch.y.data();
  if (T > 1) {
    // _spectral.pinv_solve's fast test: iso = A with the absent tasks' diagonal set to the largest diagonal
    // entry (isolated); when iso - 4 T input_eps tr(A) I is positive definite every eigenvalue of A on the
    // present tasks is above the cut-off, so A^+ x = iso^-1 x there.
    double top = 0.0, tr = 0.0;
    for (int64_t k = 0; k < T; ++k) {
      top = k == 0 ? A[0] : std::max(top, A[k * T + k]);
      tr += A[k * T + k];
    }
    top = std::max(top, 1e-300);
    std::vector<double>& iso = scratch.a;  // (the Jacobi scratch, unused on this path)
    int64_t n = 0;
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = 0; j < T; ++j) iso[static_cast<size_t>(i * T + j)] = A[i * T + j];
      if (!present[i]) iso[static_cast<size_t>(i * T + i)] += top;
      n += present[i] ? 1 : 0;
    }
    const double shift = (4.0 * static_cast<double>(T) * input_eps) * tr;
    // iso - shift I passes the test (A + (-shift) is A - shift exactly), then iso itself is factored.
    if (tr > 0.0 && dense::cholesky(iso.data(), T, -shift, L) && dense::cholesky(iso.data(), T, 0.0, L)) {
      for (int64_t i = 0; i < T; ++i) out[i] = x[i];
      dense::chol_solve(L, T, out);
      for (int64_t i = 0; i < T; ++i) out[i] = present[i] ? out[i] : 0.0;
      *converged = 1;
      *rank = n;
      return;
    }
  }
  // Rank-deficient or close (and T = 1, which the torch code always sends here): V diag(1/lam kept) V^T x.
  double* V = scratch.V.data();
  double* lam = scratch.lam.data();
  *converged = jacobi_eig(A, T, schedule, 10, 1e-15, lam, V, scratch.a.data()) ? 1 : 0;
  double big = 0.0;
  for (size_t k = 0; k < T_; ++k) big = std::max(big, std::fabs(lam[k]));
  const double cut = (static_cast<double>(T) * input_eps) * big;
  int64_t r = 0;
  for (int64_t j = 0; j < T; ++j) {
    const bool kept = std::fabs(lam[j]) > cut;
    r += kept ? 1 : 0;
    double acc = 0.0;
    for (int64_t i = 0; i < T; ++i) acc += V[i * T + j] * x[i];
    y[j] = (kept ? 1.0 / lam[j] : 0.0) * acc;
  }
  *rank = r;
  for (int64_t i = 0; i < T; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < T; ++j) acc += V[i * T + j] * y[j];
    // (T = 1: the torch code does not mask, and a 1-task module with its task absent has x = 0 anyway)
    out[i] = T == 1 || present[i] ? acc : 0.0;
  }
}

void imtl_g(const double* gram, const uint8_t* present, int64_t M, int64_t T, bool torchjd, double input_eps,
            double* weights, uint8_t* converged, int64_t* rank, int num_threads) {
  const JacobiSchedule schedule(T);
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    const size_t T_ = static_cast<size_t>(T);
    PinvScratch scratch(T);
    std::vector<double> g(T_ * T_), d(T_), v(T_);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      double* w = weights + m * T;
      const double tr = dense::trace_normalize(G, T, g.data());
      for (size_t k = 0; k < T_; ++k) d[k] = std::sqrt(std::max(g[k * T_ + k], 0.0));
      // v = (G / tr G)^+ sqrt(diag G / tr G); W = v / sum v, 0 where |sum v| < 1e-12.
      pinv_solve_one(g.data(), present + m * T, d.data(), T, input_eps, schedule, v.data(), converged + m, rank + m,
                     scratch);
      double v_sum = 0.0;
      for (size_t k = 0; k < T_; ++k) v_sum += v[k];
      // On G itself (torchjd) v is v(G / tr G) / sqrt(tr G).
      const double test = torchjd ? std::fabs(v_sum) / std::sqrt(std::max(tr, 1e-300)) : std::fabs(v_sum);
      const bool ok = test >= 1e-12;
      for (size_t k = 0; k < T_; ++k) w[k] = ok ? v[k] / v_sum : 0.0;
    }
  }
}

void config(const double* gram, const uint8_t* present, const double* pref, int64_t M, int64_t T, double input_eps,
            double* weights, uint8_t* converged, int64_t* rank, int num_threads) {
  const JacobiSchedule schedule(T);
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    const size_t T_ = static_cast<size_t>(T);
    PinvScratch scratch(T);
    std::vector<double> g(T_ * T_), c(T_ * T_), d(T_), a(T_);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      const uint8_t* p = present + m * T;
      double* w = weights + m * T;
      dense::trace_normalize(G, T, g.data());
      // _common.cosine(absent_diag=0): d = |g_k| (1 on absent tasks), C = G / (d d^T) on the present tasks with
      // an exact unit diagonal, 0 elsewhere.
      for (size_t k = 0; k < T_; ++k) d[k] = p[k] ? std::sqrt(std::max(g[k * T_ + k], 0.0)) : 1.0;
      for (size_t i = 0; i < T_; ++i)
        for (size_t j = 0; j < T_; ++j)
          c[i * T_ + j] = i == j ? (p[i] ? 1.0 : 0.0) : (p[i] && p[j] ? g[i * T_ + j] / (d[i] * d[j]) : 0.0);
      // a = D^-1 C^+ p, W = (1^T G a / max(a^T G a, 1e-24)) a (on G / tr G: both scale-free).
      pinv_solve_one(c.data(), p, pref + m * T, T, input_eps, schedule, a.data(), converged + m, rank + m, scratch);
      for (size_t k = 0; k < T_; ++k) a[k] /= d[k];
      double aga = 0.0, num = 0.0;
      for (size_t i = 0; i < T_; ++i) {
        double ga = 0.0;
        for (size_t j = 0; j < T_; ++j) ga += g[i * T_ + j] * a[j];
        aga += ga * a[i];
        num += p[i] ? ga : 0.0;
      }
      const double f = num / std::max(aga, 1e-24);
      for (size_t k = 0; k < T_; ++k) w[k] = f * a[k];
    }
  }
}

}  // namespace mgs_weighting
