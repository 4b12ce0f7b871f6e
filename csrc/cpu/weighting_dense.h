// Small dense linear algebra for the native weighting solvers: row-major T x T float64 matrices, one module per
// thread. Nothing here allocates. The functions taking int64_t T work for any T (the caller owns the buffers);
// those holding stack arrays (cholesky_ok, support_solve) take T <= kDenseMax.
#pragma once
#include <cmath>
#include <cstdint>

namespace mgs_weighting {
namespace dense {

// Largest T the fixed-size solvers take (= mgs_kernels.weighting._qp._ENUM_FALLBACK_MAX_T: beyond it the
// torch code, which has no enumeration fallback there, runs instead).
constexpr int kDenseMax = 10;
constexpr int kDenseMax2 = kDenseMax * kDenseMax;

// Cholesky factor L (lower, row-major [T, T]) of the symmetric A [T, T] with `shift` added to its diagonal.
// False where LAPACK's potrf fails: a pivot that is not > 0 (NaN included). L's upper part is not written.
inline bool cholesky(const double* A, int64_t T, double shift, double* L) {
  for (int64_t j = 0; j < T; ++j) {
    double djj = A[j * T + j] + shift;
    for (int64_t k = 0; k < j; ++k) djj -= L[j * T + k] * L[j * T + k];
    if (!(djj > 0.0)) return false;
    const double ljj = std::sqrt(djj);
    L[j * T + j] = ljj;
    for (int64_t i = j + 1; i < T; ++i) {
      double s = A[i * T + j];
      for (int64_t k = 0; k < j; ++k) s -= L[i * T + k] * L[j * T + k];
      L[i * T + j] = s / ljj;
    }
  }
  return true;
}

// Whether A + shift I [T, T] passes the Cholesky test (torch.linalg.cholesky_ex status 0).
inline bool cholesky_ok(const double* A, int T, double shift) {
  double L[kDenseMax2];
  return cholesky(A, T, shift, L);
}

// x [T] <- (L L^T)^-1 x, L from `cholesky`.
inline void chol_solve(const double* L, int64_t T, double* x) {
  for (int64_t i = 0; i < T; ++i) {
    double s = x[i];
    for (int64_t k = 0; k < i; ++k) s -= L[i * T + k] * x[k];
    x[i] = s / L[i * T + i];
  }
  for (int64_t i = T - 1; i >= 0; --i) {
    double s = x[i];
    for (int64_t k = i + 1; k < T; ++k) s -= L[k * T + i] * x[k];
    x[i] = s / L[i * T + i];
  }
}

// y [T] = A [T, T] x [T].
inline void matvec(const double* A, const double* x, int64_t T, double* y) {
  for (int64_t i = 0; i < T; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < T; ++j) s += A[i * T + j] * x[j];
    y[i] = s;
  }
}

// x^T A x.
inline double quad(const double* A, const double* x, int64_t T) {
  double s = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    double r = 0.0;
    for (int64_t j = 0; j < T; ++j) r += A[i * T + j] * x[j];
    s += r * x[i];
  }
  return s;
}

// tr G of [T, T] G, and what a module's Gram is divided by (_common.trace_normalize: tr G, or 1 for an
// all-zero module, which stays zero).
inline double trace(const double* G, int64_t T) {
  double tr = 0.0;
  for (int64_t k = 0; k < T; ++k) tr += G[k * T + k];
  return tr;
}
inline double trace_divisor(double tr) { return tr > 0.0 ? tr : 1.0; }

// g [T, T] = G / trace_divisor(tr G); returns tr G.
inline double trace_normalize(const double* G, int64_t T, double* g) {
  const double tr = trace(G, T);
  const double s = trace_divisor(tr);
  for (int64_t i = 0; i < T * T; ++i) g[i] = G[i] / s;
  return tr;
}

// Solves of the support block: A restricted to the tasks with f[k] (identity elsewhere, as in the torch
// code's masked Cholesky). For each of the n right-hand sides rhs[r] [T] (read on the support only),
// x[r] [T] = A_FF^-1 rhs_F on the support, 0 elsewhere. False (x untouched) where A_FF fails Cholesky.
inline bool support_solve(const double* A, const bool* f, int T, int n, const double* const* rhs, double* const* x) {
  int idx[kDenseMax];
  int m = 0;
  for (int k = 0; k < T; ++k)
    if (f[k]) idx[m++] = k;
  double sub[kDenseMax2], L[kDenseMax2];
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) sub[i * m + j] = A[idx[i] * T + idx[j]];
  if (!cholesky(sub, m, 0.0, L)) return false;
  for (int r = 0; r < n; ++r) {
    double y[kDenseMax];
    for (int i = 0; i < m; ++i) y[i] = rhs[r][idx[i]];
    chol_solve(L, m, y);
    for (int k = 0; k < T; ++k) x[r][k] = 0.0;
    for (int i = 0; i < m; ++i) x[r][idx[i]] = y[i];
  }
  return true;
}

}  // namespace dense
}  // namespace mgs_weighting
