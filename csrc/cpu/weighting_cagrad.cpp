// CAGrad's weights on the CPU: mgs_kernels/weighting/cagrad.py (compute, _solve, _polish) one module at a
// time; see mgs_weighting.h for the conventions and cagrad.py for the derivation of each step.
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "mgs_weighting.h"
#include "weighting_dense.h"
#include "weighting_lcp.h"

namespace mgs_weighting {

namespace {

using dense::kDenseMax;
using dense::kDenseMax2;

// The closed form on the support f [T] (of the QP's answer) with the Gram g [T, T]: x1 = H^-1 1_F,
// x2 = H^-1 b_F (H = g_FF), qv = (s2 / s1) x1 - x2 [T], and t* = (s1 (1 - qv^T g qv / rho^2))^-1/2.
// Returns ok (H positive definite, s1 > 0, the bracket positive); x1 [T], qv [T], s1_safe, t_star out.
bool closed_form(const double* g, const bool* f, const double* b, int T, double rho, double* x1, double* qv,
                 double* s1_safe, double* t_star) {
  double one_f[kDenseMax], b_f[kDenseMax], x2[kDenseMax];
  for (int k = 0; k < T; ++k) {
    one_f[k] = f[k] ? 1.0 : 0.0;
    b_f[k] = f[k] ? b[k] : 0.0;
  }
  const double* rhs[2] = {one_f, b_f};
  double* x[2] = {x1, x2};
  if (!dense::support_solve(g, f, T, 2, rhs, x)) return false;
  double s1 = 0.0, s2 = 0.0;
  for (int k = 0; k < T; ++k) {
    s1 += x1[k];
    s2 += x2[k];
  }
  *s1_safe = s1 > 0.0 ? s1 : 1.0;
  for (int k = 0; k < T; ++k) qv[k] = (s2 / *s1_safe) * x1[k] - x2[k];
  const double den = 1.0 - dense::quad(g, qv, T) / (rho * rho);
  if (!(s1 > 0.0 && den > 0.0)) return false;
  *t_star = std::sqrt(1.0 / (*s1_safe * den));
  return true;
}

// _polish: where the solve was regularised, the closed form once more on w's support with the Gram gn as
// given, kept where it is a KKT point of the problem as posed and its objective is not higher. w [T] in/out.
void polish(const double* gn, const bool* p, const double* b, int T, double rho, double* w) {
  bool f[kDenseMax];
  for (int k = 0; k < T; ++k) f[k] = w[k] > 0.0 && p[k];
  double x1[kDenseMax], qv[kDenseMax], s1_safe = 1.0, t_star = 0.0;
  if (!closed_form(gn, f, b, T, rho, x1, qv, &s1_safe, &t_star)) return;
  double wp[kDenseMax];
  for (int k = 0; k < T; ++k) wp[k] = f[k] ? x1[k] / s1_safe + (t_star / rho) * qv[k] : 0.0;
  // The objective and the size of its terms (the comparison below allows rounding: see cagrad.py _polish).
  auto objective = [&](const double* v, double* size) {
    double vb = 0.0;
    for (int k = 0; k < T; ++k) vb += v[k] * b[k];
    const double vn = rho * std::sqrt(std::fmax(dense::quad(gn, v, T), 0.0));
    *size = std::fabs(vb) + vn;
    return vb + vn;
  };
  const double gwp = std::sqrt(std::fmax(dense::quad(gn, wp, T), 0.0));
  if (!(gwp > 0.0)) return;
  double gw[kDenseMax], grad[kDenseMax];
  dense::matvec(gn, wp, T, gw);
  double lam = 0.0, scale = 0.0;
  for (int k = 0; k < T; ++k) {
    grad[k] = b[k] + (rho / gwp) * gw[k];
    lam += grad[k] * wp[k];  // equal on the support; wp sums to 1
    scale = std::fmax(scale, std::fabs(grad[k]));
  }
  double off = 0.0;  // the most improving vertex off the support
  bool nonneg = true;
  for (int k = 0; k < T; ++k) {
    if (p[k] && !f[k]) off = std::fmax(off, lam - grad[k]);
    nonneg = nonneg && wp[k] >= 0.0;
  }
  double size_p = 0.0, size_w = 0.0;
  const double obj_p = objective(wp, &size_p), obj_w = objective(w, &size_w);
  if (nonneg && off <= 1e-9 * scale && obj_p <= obj_w + 1e-12 * size_w)
    for (int k = 0; k < T; ++k) w[k] = wp[k];
}

struct CAGradOptions {
  double c, norm_eps;
  bool torchjd;
  bool auto_reg;
  double reg_eps;
  int64_t max_iters, max_pivots;
};

void cagrad_one(const double* G, const uint8_t* present, int T, const CAGradOptions& o, double* weights,
                uint8_t* converged, int64_t* iterations, double* reg) {
  // Trace normalisation (and torchjd's absolute test: an all-zero module below norm_eps).
  const double tr = dense::trace(G, T);
  const double s_tr = dense::trace_divisor(tr);
  const bool zeroed = o.torchjd && tr < o.norm_eps;
  double gn[kDenseMax2];
  for (int i = 0; i < T * T; ++i) gn[i] = zeroed ? 0.0 : G[i] / s_tr;
  bool p[kDenseMax];
  int n = 0;
  for (int k = 0; k < T; ++k) {
    p[k] = present[k] && !zeroed;
    n += p[k] ? 1 : 0;
  }
  double u[kDenseMax], b[kDenseMax];
  for (int k = 0; k < T; ++k) u[k] = p[k] ? 1.0 / static_cast<double>(n > 0 ? n : 1) : 0.0;
  dense::matvec(gn, u, T, b);  // G u: the task gradients' inner products with g0
  double g0sq = 0.0;
  for (int k = 0; k < T; ++k) g0sq += b[k] * u[k];
  const double rho = o.c * std::sqrt(std::fmax(g0sq, 0.0));

  // _solve. Cosine matrix (absent tasks: unit coordinates) and task norms, then the regularisation.
  double C[kDenseMax2], d[kDenseMax];
  for (int k = 0; k < T; ++k) d[k] = p[k] ? std::sqrt(std::fmax(gn[k * T + k], 0.0)) : 1.0;
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j)
      C[i * T + j] = i == j ? 1.0 : (p[i] && p[j] ? gn[i * T + j] / (d[i] * d[j]) : 0.0);
  const double delta = o.auto_reg ? lcp::auto_regularization(C, T) : o.reg_eps;
  // Regularised G (relative to each task's squared norm), absent tasks isolated.
  double gr[kDenseMax2];
  for (int i = 0; i < T * T; ++i) gr[i] = gn[i];
  for (int k = 0; k < T; ++k) gr[k * T + k] += p[k] ? delta * d[k] * d[k] : 1.0;
  const double rho_safe = rho > 0.0 ? rho : 1.0;
  // |g_w| <= max_k |g_k| (regularised: the problem solved), so t* is in [0, hi].
  double hi = 0.0;
  for (int k = 0; k < T; ++k)
    if (p[k]) hi = std::fmax(hi, gr[k * T + k]);
  hi = std::sqrt(hi);
  if (!(hi > 0.0)) hi = 1.0;
  double lo = 0.0;
  const double slack = 1e-12 * hi;  // t* of a vertex is |g_k| = hi up to rounding
  double t = std::fmin(std::fmax(std::sqrt(std::fmax(g0sq, 0.0)), 1e-3 * hi), hi);  // |g0|
  double t_prev = -1.0;
  bool done = !(rho > 0.0) || n == 0;
  double w[kDenseMax] = {0.0};
  int64_t iters = 0;
  for (int64_t it = 0; it < o.max_iters && !done; ++it) {
    const double s = rho_safe / t;
    const double kk = g0sq / s;
    // Q = s/2 G + sym(G u 1^T) + K 1 1^T on the present tasks, identity on the absent ones.
    double Q[kDenseMax2], q[kDenseMax] = {}, z[kDenseMax] = {};
    for (int i = 0; i < T; ++i) {
      for (int j = 0; j < T; ++j) {
        const double pp = p[i] && p[j] ? 1.0 : 0.0;
        const double bp = 0.5 * (b[i] * (p[j] ? 1.0 : 0.0) + (p[i] ? 1.0 : 0.0) * b[j]);
        Q[i * T + j] = 0.5 * s * gr[i * T + j] * pp + bp + kk * pp + (i == j && !p[i] ? 1.0 : 0.0);
      }
      q[i] = p[i] ? -1.0 : 0.0;
    }
    int64_t pivots = 0;
    lcp::solve(Q, q, T, o.max_pivots, /*start_all=*/true, lcp::well_conditioned(Q, T), z, &pivots);
    double zs = 0.0;
    for (int k = 0; k < T; ++k) zs += z[k];
    double w_t[kDenseMax];
    for (int k = 0; k < T; ++k) w_t[k] = z[k] / (zs > 0.0 ? zs : 1.0);
    for (int k = 0; k < T; ++k) w[k] = w_t[k];
    ++iters;
    // Bracket: |g_w(t)| / t decreases in t and equals 1 at the answer.
    const double dn = std::sqrt(std::fmax(dense::quad(gr, w_t, T), 0.0));
    if (!(dn <= t)) lo = t;
    if (!(dn > t)) hi = t;
    // Closed form on the support F of w(t).
    bool f[kDenseMax];
    for (int k = 0; k < T; ++k) f[k] = z[k] > 0.0 && p[k];
    double x1[kDenseMax], qv[kDenseMax], s1_safe = 1.0, t_star = 0.0;
    const bool ok = closed_form(gr, f, b, T, rho_safe, x1, qv, &s1_safe, &t_star);
    const bool inside = ok && t_star >= lo - slack && t_star <= hi + slack;
    const bool converged_now = ok && std::fabs(t_star - t) <= slack;
    // The supports on either side of the answer can send the closed form back to the t tried before
    // (a 2-cycle, seen on rank-deficient G): bisect there instead.
    const bool cycle = ok && std::fabs(t_star - t_prev) <= slack;
    const double t_next = inside && !cycle ? std::fmin(std::fmax(t_star, lo), hi) : 0.5 * (lo + hi);
    t_prev = t;
    if (converged_now) {
      for (int k = 0; k < T; ++k) w[k] = x1[k] / s1_safe + (t_star / rho_safe) * qv[k];
      done = true;
    } else {
      t = t_next;
    }
  }
  // delta = 1e-12 (a Gram positive semi-definite to working precision) moves the answer by ~1e-12; more is
  // rounding that made G indefinite (float32 Grams of singular families), whose bias the polish removes.
  if (done && delta > 1e-12) polish(gn, p, b, T, rho_safe, w);

  // The weights: u + (rho / |g_w|) w; the mean where the ball is a point (c = 0 or g0 = 0); zero where
  // |g_w| < norm_eps (Pareto stationary, as in torchjd).
  const double gw = std::sqrt(std::fmax(dense::quad(gn, w, T), 0.0));
  const bool ok = gw >= o.norm_eps && gw > 0.0;
  for (int k = 0; k < T; ++k) {
    double v = rho > 0.0 ? u[k] + (rho / (ok ? gw : 1.0)) * w[k] : u[k];
    weights[k] = ok || rho <= 0.0 ? v : 0.0;
  }
  *converged = done ? 1 : 0;
  *iterations = iters;
  *reg = delta;
}

}  // namespace

void cagrad(const double* gram, const uint8_t* present, int64_t M, int64_t T, double c, double norm_eps,
            bool torchjd, bool auto_reg, double reg_eps, int64_t max_iters, int64_t max_pivots, double* weights,
            uint8_t* converged, int64_t* iterations, double* reg, int num_threads) {
  if (T < 1 || T > dense::kDenseMax) throw std::invalid_argument("cagrad: native solver takes 1 <= T <= 10");
  const CAGradOptions o{c, norm_eps, torchjd, auto_reg, reg_eps, max_iters, max_pivots};
  const int t = static_cast<int>(T);
#pragma omp parallel for num_threads(num_threads > 0 ? num_threads : 1) schedule(static) if (M > 16)
  for (int64_t m = 0; m < M; ++m)
    cagrad_one(gram + m * T * T, present + m * T, t, o, weights + m * T, converged + m, iterations + m, reg + m);
}

}  // namespace mgs_weighting
