// The LCP solver of the QP-based weighting methods (UPGrad, DualProj, exact MGDA, CAGrad) for one problem:
// mgs_kernels/weighting/_qp.py's ``solve_lcp(..., solver="auto")`` as it runs on the CPU, in scalar float64.
//
//   LCP(A, q): find z >= 0 with w = A z + q >= 0 and z^T w = 0   (A [T, T] positive definite, q [T]).
//
// Murty's least-index principal pivoting (``lcp_pivot``) with 2 steps of iterative refinement, a KKT check
// (``kkt_ok``) on the original data, and, for a matrix that fails the Cholesky test A - 1e-8 maxdiag I
// (a regularised singular Gram: the tableau loses about cond(A) digits) or a problem that fails the KKT
// check, enumeration of all 2^T active sets (``lcp_enumerate``), whose Cholesky solves are backward stable.
// T <= dense::kDenseMax (the torch code's enumeration limit).
#pragma once
#include <cmath>
#include <cstdint>

#include "weighting_dense.h"

namespace mgs_weighting {
namespace lcp {

using dense::kDenseMax;
using dense::kDenseMax2;

// default_max_pivots of _qp.py: 2^T for T <= 8 (exact termination), else 4 T.
inline int64_t default_max_pivots(int T) { return T <= 8 ? (int64_t{1} << T) : 4 * static_cast<int64_t>(T); }

inline double max_abs(const double* x, int T) {
  double m = 0.0;
  for (int k = 0; k < T; ++k) m = std::fmax(m, std::fabs(x[k]));
  return m;
}

// lcp_pivot for one problem: z [T] (>= 0) out, pivots out; returns converged (no component of the final
// basic solution below -tol max|q|, no failed pivot). start_all: start from the all-basic tableau A^-1
// (by Cholesky; where that fails the problem is returned unconverged with z = 0, and the caller's
// Cholesky test sends it to enumeration).
inline bool pivot(const double* A, const double* q, int T, int64_t max_pivots, bool start_all, double* z,
                  int64_t* pivots, double tol = 1e-13) {
  double tab[kDenseMax2], c[kDenseMax];
  bool basic[kDenseMax];
  *pivots = 0;
  if (start_all) {
    double L[kDenseMax2];
    if (!dense::cholesky(A, T, 0.0, L)) {
      for (int k = 0; k < T; ++k) z[k] = 0.0;
      return false;
    }
    for (int j = 0; j < T; ++j) {  // column j of A^-1 (symmetric: stored as row j)
      double e[kDenseMax];
      for (int k = 0; k < T; ++k) e[k] = k == j ? 1.0 : 0.0;
      dense::chol_solve(L, T, e);
      for (int k = 0; k < T; ++k) tab[j * T + k] = e[k];
    }
    for (int i = 0; i < T; ++i) {
      double s = 0.0;
      for (int j = 0; j < T; ++j) s += tab[i * T + j] * q[j];
      c[i] = -s;
      basic[i] = true;
    }
  } else {
    for (int i = 0; i < T * T; ++i) tab[i] = A[i];
    for (int i = 0; i < T; ++i) {
      c[i] = q[i];
      basic[i] = false;
    }
  }
  const double thr = -tol * max_abs(q, T);
  bool failed = false;
  for (int64_t it = 0; it < max_pivots; ++it) {
    int k = -1;
    for (int i = 0; i < T && k < 0; ++i)
      if (c[i] < thr) k = i;  // least index with c_k < 0
    if (k < 0) break;
    const double p = tab[k * T + k];
    if (!(p > 1e-300)) {  // a P-matrix has positive pivots; else the problem stops
      failed = true;
      break;
    }
    // Principal pivot on k as one rank-1 update: A' = A - (A[:, k] + e_k)(A[k, :] - e_k)^T / A_kk,
    // c' = c - (A[:, k] + e_k) c_k / A_kk (exchanges z_k and w_k in the basis).
    double a[kDenseMax], bv[kDenseMax];
    for (int i = 0; i < T; ++i) {
      a[i] = tab[i * T + k] + (i == k ? 1.0 : 0.0);
      bv[i] = (tab[k * T + i] - (i == k ? 1.0 : 0.0)) / p;
    }
    const double ck = c[k] / p;
    for (int i = 0; i < T; ++i) {
      for (int j = 0; j < T; ++j) tab[i * T + j] -= a[i] * bv[j];
      c[i] -= a[i] * ck;
    }
    basic[k] = !basic[k];
    ++*pivots;
  }
  bool converged = !failed;
  for (int i = 0; i < T; ++i)
    if (c[i] < thr) converged = false;
  // Iterative refinement on the final active set F: the tableau's F x F block is A_FF^-1, so
  // z_F -= A_FF^-1 (A z + q)_F (twice: the tableau inverse carries the pivots' rounding).
  for (int i = 0; i < T; ++i) z[i] = basic[i] ? c[i] : 0.0;
  for (int step = 0; step < 2; ++step) {
    double resid[kDenseMax];
    for (int i = 0; i < T; ++i) {
      double s = 0.0;
      for (int j = 0; j < T; ++j) s += A[i * T + j] * z[j];
      resid[i] = basic[i] ? s + q[i] : 0.0;
    }
    for (int i = 0; i < T; ++i) {
      if (!basic[i]) continue;
      double s = 0.0;
      for (int j = 0; j < T; ++j)
        if (basic[j]) s += tab[i * T + j] * resid[j];
      z[i] -= s;
    }
  }
  for (int i = 0; i < T; ++i) z[i] = z[i] < 0.0 ? 0.0 : z[i];  // clamp_min, NaN kept (then fails kkt_ok)
  return converged;
}

// kkt_ok of _qp.py: z >= 0 solves LCP(A, q) to rtol (w >= -tol, max|z_i w_i| <= tol (max|z| + 1), w finite).
inline bool kkt_ok(const double* A, const double* q, const double* z, int T, double rtol = 1e-9) {
  double w[kDenseMax];
  double scale_az = 0.0;
  for (int i = 0; i < T; ++i) {
    double s = 0.0, sa = 0.0;
    for (int j = 0; j < T; ++j) {
      s += A[i * T + j] * z[j];
      sa += std::fabs(A[i * T + j]) * z[j];
    }
    w[i] = s + q[i];
    scale_az = std::fmax(scale_az, sa);
  }
  const double tol = rtol * (max_abs(q, T) + scale_az) + 1e-300;
  double compl_max = 0.0;
  for (int i = 0; i < T; ++i) {
    if (!std::isfinite(w[i]) || !(w[i] >= -tol)) return false;
    compl_max = std::fmax(compl_max, std::fabs(z[i] * w[i]));
  }
  return compl_max <= tol * (max_abs(z, T) + 1.0);
}

// lcp_enumerate for one problem: of the 2^T candidate active sets (bit k of the set index = z_k basic),
// the first with the smallest KKT violation; z [T] out (>= 0). Converged when that violation is within
// tol max|q|.
inline bool enumerate(const double* A, const double* q, int T, double* z, double tol = 1e-10) {
  double best = INFINITY;
  double zc[kDenseMax], rhs[kDenseMax];
  bool f[kDenseMax];
  for (int k = 0; k < T; ++k) {
    z[k] = 0.0;
    rhs[k] = -q[k];
  }
  const double* rhs_p[1] = {rhs};
  double* zc_p[1] = {zc};
  for (int64_t set = 0; set < (int64_t{1} << T); ++set) {
    for (int k = 0; k < T; ++k) f[k] = (set >> k) & 1;
    double viol = 0.0;
    if (!dense::support_solve(A, f, T, 1, rhs_p, zc_p)) {
      viol = INFINITY;
    } else {
      bool finite = true;
      for (int i = 0; i < T; ++i) {
        double s = 0.0;
        for (int j = 0; j < T; ++j) s += A[i * T + j] * zc[j];
        const double w = s + q[i];
        finite = finite && std::isfinite(w) && std::isfinite(zc[i]);
        viol = std::fmax(viol, f[i] ? -zc[i] : -w);
      }
      if (!finite) viol = INFINITY;
    }
    // argmin's first minimum; the empty set (set 0) always solves, so z is set there.
    if (set == 0 || viol < best) {
      best = viol;
      for (int k = 0; k < T; ++k) z[k] = std::fmax(zc[k], 0.0);
    }
  }
  return best <= tol * max_abs(q, T) + 1e-300;
}

// Whether A's tableau is trusted: A - 1e-8 max_k A_kk I passes the Cholesky test (else enumerate).
inline bool well_conditioned(const double* A, int T) {
  double scale = -INFINITY;
  for (int k = 0; k < T; ++k) scale = std::fmax(scale, A[k * T + k]);
  return dense::cholesky_ok(A, T, -(1e-8 * scale));
}

// solve_lcp(A, q, solver="auto") on the CPU for one right-hand side: z [T] out, pivots out (of the pivoting
// solver, also where enumeration then solved it); returns converged. `trusted` = well_conditioned(A, T),
// computed once per matrix.
inline bool solve(const double* A, const double* q, int T, int64_t max_pivots, bool start_all, bool trusted,
                  double* z, int64_t* pivots) {
  bool conv = pivot(A, q, T, max_pivots, start_all, z, pivots);
  conv = conv && kkt_ok(A, q, z, T);
  if (!conv || !trusted) conv = enumerate(A, q, T, z);
  return conv;
}

// auto_regularization of _qp.py for one cosine matrix C [T, T] (unit diagonal): the first delta of
// REG_LADDER (0, 1e-12, 1e-11, ..., 1e-4) whose Cholesky test C + shift I passes (shift -1e-10 for 0,
// delta / 2 for the others); the largest when none does.
inline double auto_regularization(const double* C, int T) {
  static constexpr double kLadder[] = {0.0, 1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4};
  constexpr int n = static_cast<int>(sizeof(kLadder) / sizeof(kLadder[0]));
  for (int l = 0; l < n; ++l) {
    const double shift = l == 0 ? -1e-10 : 0.5 * kLadder[l];
    if (dense::cholesky_ok(C, T, shift)) return kLadder[l];
  }
  return kLadder[n - 1];
}

}  // namespace lcp
}  // namespace mgs_weighting
