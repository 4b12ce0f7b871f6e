// The dual-cone projections of UPGrad / DualProj and MGDA's exact min-norm point on the CPU:
// mgs_kernels/weighting/_projection.py (project_dual_cone, regularized_cosine) and mgda.py (min_norm_point),
// one module at a time; see mgs_weighting.h for the conventions.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mgs_weighting.h"
#include "weighting_dense.h"
#include "weighting_lcp.h"

namespace mgs_weighting {

namespace {

using dense::kDenseMax;
using dense::kDenseMax2;

// regularized_cosine: A = C + delta I [T, T] of G / tr G (absent tasks: unit coordinates, 1 + delta on the
// diagonal), d [T] the task norms |g_k| of G / tr G (1 on absent tasks); returns delta (auto_regularization
// of C, or reg_eps).
double regularized_cosine(const double* G, const uint8_t* present, int T, bool auto_reg, double reg_eps, double* A,
                          double* d) {
  const double tr = dense::trace(G, T);
  const double s = dense::trace_divisor(tr);
  for (int k = 0; k < T; ++k) d[k] = present[k] ? std::sqrt(std::fmax(G[k * T + k] / s, 0.0)) : 1.0;
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j)
      A[i * T + j] = i == j ? 1.0 : (present[i] && present[j] ? (G[i * T + j] / s) / (d[i] * d[j]) : 0.0);
  const double delta = auto_reg ? lcp::auto_regularization(A, T) : reg_eps;
  for (int k = 0; k < T; ++k) A[k * T + k] += delta;
  return delta;
}

// torchjd_gram: G / tr G (all zeros when tr G < norm_eps) plus reg_eps I on the present tasks, absent tasks
// isolated unit coordinates. A [T, T] out.
void torchjd_gram(const double* G, const uint8_t* present, int T, double norm_eps, double reg_eps, double* A) {
  const double tr = dense::trace(G, T);
  const double s = dense::trace_divisor(tr);
  const bool zeroed = tr < norm_eps;
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j) {
      const double a = (zeroed ? 0.0 : G[i * T + j] / s) + (i == j ? reg_eps : 0.0);
      A[i * T + j] = present[i] && present[j] ? a : (i == j ? 1.0 : 0.0);
    }
}

struct ProjectionOptions {
  bool torchjd, auto_reg;
  double norm_eps, reg_eps;
  int64_t max_pivots;
};

// One module of project_dual_cone: the R rows v_r = b_r + x_r (x_r = LCP(A, A b_r)), divided by d in the
// default mode. U [R, T] preference rows, V [R, T] out.
void projection_one(const double* G, const uint8_t* present, const double* U, int R, int T,
                    const ProjectionOptions& o, double* V, uint8_t* converged, int64_t* iterations, double* reg) {
  double A[kDenseMax2], d[kDenseMax];
  if (o.torchjd) {
    torchjd_gram(G, present, T, o.norm_eps, o.reg_eps, A);
    for (int k = 0; k < T; ++k) d[k] = 1.0;
    *reg = o.reg_eps;  // not reported in this mode (the Python side leaves "reg" out)
  } else {
    *reg = regularized_cosine(G, present, T, o.auto_reg, o.reg_eps, A, d);
  }
  const bool trusted = lcp::well_conditioned(A, T);
  bool conv = true;
  int64_t iters = 0;
  for (int r = 0; r < R; ++r) {
    double b[kDenseMax] = {}, q[kDenseMax] = {}, x[kDenseMax] = {};
    for (int k = 0; k < T; ++k) b[k] = U[r * T + k] * d[k];
    dense::matvec(A, b, T, q);  // q_r = A b_r
    int64_t pivots = 0;
    conv = lcp::solve(A, q, T, o.max_pivots, /*start_all=*/false, trusted, x, &pivots) && conv;
    iters = pivots > iters ? pivots : iters;
    for (int k = 0; k < T; ++k) V[r * T + k] = (b[k] + x[k]) / d[k];
  }
  *converged = conv ? 1 : 0;
  *iterations = iters;
}

// One module of min_norm_point: z = LCP(C + delta I, -p / d) from the all-basic start, b = z / d,
// w = b / sum b [T].
void min_norm_one(const double* G, const uint8_t* present, int T, bool auto_reg, double reg_eps,
                  int64_t max_pivots, double* w, uint8_t* converged, int64_t* iterations, double* reg) {
  double A[kDenseMax2], d[kDenseMax], q[kDenseMax] = {}, z[kDenseMax] = {};
  *reg = regularized_cosine(G, present, T, auto_reg, reg_eps, A, d);
  for (int k = 0; k < T; ++k) q[k] = present[k] ? -(1.0 / d[k]) : 0.0;
  int64_t pivots = 0;
  *converged = lcp::solve(A, q, T, max_pivots, /*start_all=*/true, lcp::well_conditioned(A, T), z, &pivots) ? 1 : 0;
  *iterations = pivots;
  double s = 0.0;
  for (int k = 0; k < T; ++k) {
    z[k] /= d[k];
    s += z[k];
  }
  for (int k = 0; k < T; ++k) w[k] = z[k] / (s > 0.0 ? s : 1.0);
}

void check_tasks(const char* name, int64_t T) {
  if (T < 1 || T > dense::kDenseMax)
    throw std::invalid_argument(std::string(name) + ": native solver takes 1 <= T <= 10");
}

}  // namespace

void dual_cone_projection(const double* gram, const uint8_t* present, const double* U, int64_t M, int64_t R,
                          int64_t T, bool torchjd, double norm_eps, bool auto_reg, double reg_eps, int64_t max_pivots,
                          double* V, uint8_t* converged, int64_t* iterations, double* reg, int num_threads) {
  check_tasks("dual_cone_projection", T);
  const ProjectionOptions o{torchjd, auto_reg, norm_eps, reg_eps, max_pivots};
  const int t = static_cast<int>(T), r = static_cast<int>(R);
#pragma omp parallel for num_threads(num_threads > 0 ? num_threads : 1) schedule(static) if (M > 16)
  for (int64_t m = 0; m < M; ++m)
    projection_one(gram + m * T * T, present + m * T, U + m * R * T, r, t, o, V + m * R * T, converged + m,
                   iterations + m, reg + m);
}

void mgda_min_norm(const double* gram, const uint8_t* present, int64_t M, int64_t T, bool auto_reg, double reg_eps,
                   int64_t max_pivots, double* weights, uint8_t* converged, int64_t* iterations, double* reg,
                   int num_threads) {
  check_tasks("mgda_min_norm", T);
  const int t = static_cast<int>(T);
#pragma omp parallel for num_threads(num_threads > 0 ? num_threads : 1) schedule(static) if (M > 16)
  for (int64_t m = 0; m < M; ++m)
    min_norm_one(gram + m * T * T, present + m * T, t, auto_reg, reg_eps, max_pivots, weights + m * T,
                 converged + m, iterations + m, reg + m);
}

}  // namespace mgs_weighting
