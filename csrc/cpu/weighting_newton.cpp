// The damped Newton solver of FairGrad and Nash-MTL: see weighting_newton.h and
// mgs_kernels/weighting/_newton.py, whose batched torch code this follows operation for operation (same
// starting point, line-search candidates, acceptance test, stopping tests and best-iterate rule), so that
// both paths take the same steps and stop at the same iteration.
#include "weighting_newton.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "weighting_dense.h"

namespace mgs_weighting {

namespace {

constexpr int kSteps = 8;     // line-search candidates 2^0 .. 2^-6 and the damped Newton step
constexpr double kDone = 1e-13;  // residual of a solved module

// x^e with torch's special cases for e = -1 (a reciprocal) and e = 1.
inline double pow_(double x, double e) {
  if (e == -1.0) return 1.0 / x;
  if (e == 1.0) return x;
  return std::pow(x, e);
}

// h(w) with h'(w) = w^(-1/a): log w for a = 1, else w^(1 - 1/a) / (1 - 1/a).
inline double h_(double w, double a) {
  if (a == 1.0) return std::log(w);
  const double e = 1.0 - 1.0 / a;
  return std::pow(w, e) / e;
}

// NaN-propagating running maximum (torch.amax propagates NaN).
inline double max_nan(double r, double x) { return (std::isnan(r) || std::isnan(x) || x > r) ? (std::isnan(r) ? r : x) : r; }

// max_i |w_i^(1/a) (G w)_i - 1| over the present tasks (0 for none).
double residual(const double* gw, const double* w, const uint8_t* present, int64_t T, double a) {
  double r = 0.0;
  for (int64_t k = 0; k < T; ++k) {
    if (!present[k]) continue;
    const double wc = w[k] > 0.0 ? w[k] : 0.0;  // clamp_min(0) (NaN stays NaN below through the product)
    const double wa = a == 1.0 ? (std::isnan(w[k]) ? w[k] : wc) : pow_(std::isnan(w[k]) ? w[k] : wc, 1.0 / a);
    r = max_nan(r, std::fabs(wa * gw[k] - 1.0));
  }
  return r;
}

// _newton.diagonal_start: w0 where valid (positive on the present tasks, finite everywhere), else the
// solution for diag(G); then the best multiple of it. Writes w [T].
void diagonal_start(const double* G, const uint8_t* present, int64_t T, double a, const double* w0, double* w,
                    double* gv) {
  for (int64_t k = 0; k < T; ++k) {
    const double d = G[k * T + k] > 1e-300 ? G[k * T + k] : 1e-300;
    w[k] = present[k] ? std::pow(d, -a / (a + 1.0)) : 0.0;
  }
  if (w0 != nullptr) {
    bool valid = true;
    for (int64_t k = 0; k < T; ++k) valid = valid && (present[k] ? w0[k] > 0.0 : true) && std::isfinite(w0[k]);
    if (valid)
      for (int64_t k = 0; k < T; ++k) w[k] = w0[k] * (present[k] ? 1.0 : 0.0);
  }
  dense::matvec(G, w, T, gv);
  double vgv = 0.0, num = 0.0;
  for (int64_t k = 0; k < T; ++k) vgv += gv[k] * w[k];
  for (int64_t k = 0; k < T; ++k)
    if (present[k]) num += pow_(w[k] > 1e-300 ? w[k] : 1e-300, 1.0 - 1.0 / a);
  const double tau = vgv > 0.0 ? std::pow(num / vgv, a / (a + 1.0)) : 1.0;
  for (int64_t k = 0; k < T; ++k) w[k] *= tau;
}

}  // namespace

NewtonScratch::NewtonScratch(int64_t T)
    : w(static_cast<size_t>(T)), gw(w), best(w), ws(w), hp(w), grad(w), delta(w), gd(w),
      hess(static_cast<size_t>(T * T)), chol(hess) {}

double alpha_fair_one(const double* G, const uint8_t* present, int64_t T, double a, int64_t max_iters,
                      const double* w0, double* out, int64_t* iterations, NewtonScratch& s) {
  double* w = s.w.data();
  double* gw = s.gw.data();
  diagonal_start(G, present, T, a, w0, w, gw);
  dense::matvec(G, w, T, gw);
  double res = residual(gw, w, present, T, a);
  bool done = res <= kDone;
  for (int64_t k = 0; k < T; ++k) s.best[k] = w[k];
  double best_res = res;
  int64_t iters = 0;
  const double inv_a = -1.0 / a;
  for (int64_t it = 0; it < max_iters && !done; ++it) {
    for (int64_t k = 0; k < T; ++k) {
      const double p = present[k] ? 1.0 : 0.0;
      s.ws[k] = present[k] ? w[k] : 1.0;
      s.hp[k] = pow_(s.ws[k], inv_a);
      s.grad[k] = (gw[k] - s.hp[k]) * p;
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        const double pp = (present[i] && present[j]) ? 1.0 : 0.0;
        double v = G[i * T + j] * pp;
        if (i == j) v += (s.hp[i] / s.ws[i]) * ((present[i] ? 1.0 : 0.0) / a) + (present[i] ? 0.0 : 1.0);
        s.hess[i * T + j] = v;
      }
    // A Hessian that fails Cholesky leaves the module where it is for every later iteration (the torch
    // code's move mask): stopping here is the same result.
    if (!dense::cholesky(s.hess.data(), T, 0.0, s.chol.data())) break;
    for (int64_t k = 0; k < T; ++k) s.delta[k] = s.grad[k];
    dense::chol_solve(s.chol.data(), T, s.delta.data());
    double lam2 = 0.0;
    for (int64_t k = 0; k < T; ++k) {
      s.delta[k] *= present[k] ? 1.0 : 0.0;
      lam2 += s.grad[k] * s.delta[k];
    }
    dense::matvec(G, s.delta.data(), T, s.gd.data());
    double q1 = 0.0, q2 = 0.0;
    for (int64_t k = 0; k < T; ++k) q1 += s.delta[k] * gw[k];
    for (int64_t k = 0; k < T; ++k) q2 += s.delta[k] * s.gd[k];
    q2 *= 0.5;
    const double damped = 1.0 / (1.0 + std::sqrt(lam2 < 0.0 ? 0.0 : lam2)  /* clamp_min keeps NaN */);
    // The longest acceptable candidate (1, 1/2, ..., 2^-6, then the damped step): positive on the
    // present tasks, Armijo decrease of f, finite.
    double step = 0.0;
    for (int c = 0; c < kSteps; ++c) {
      const double t = c < kSteps - 1 ? std::ldexp(1.0, -c) : damped;
      bool positive = true;
      double dh = 0.0;
      for (int64_t k = 0; k < T; ++k) {
        if (!present[k]) continue;
        const double cand = w[k] - t * s.delta[k];
        if (!(cand > 0.0)) {
          positive = false;
          break;
        }
        dh += h_(cand, a) - h_(s.ws[k], a);
      }
      if (!positive) continue;
      const double df = -t * q1 + t * t * q2 - dh;
      // Near the answer f no longer resolves the decrease: take the full step (quadratic region).
      const bool armijo = df <= -1e-4 * t * lam2 || (c == 0 && lam2 < 1e-10);
      if (armijo && std::isfinite(df)) {
        step = t;
        break;
      }
    }
    for (int64_t k = 0; k < T; ++k) w[k] = w[k] - step * s.delta[k];
    dense::matvec(G, w, T, gw);
    ++iters;
    res = residual(gw, w, present, T, a);
    // The best iterate is returned: on an ill-conditioned module rounding can make a late step worse.
    if (res < best_res) {
      for (int64_t k = 0; k < T; ++k) s.best[k] = w[k];
      best_res = res;
    }
    done = res <= kDone || lam2 <= 1e-26;
  }
  for (int64_t k = 0; k < T; ++k) out[k] = s.best[k] * (present[k] ? 1.0 : 0.0);
  *iterations = iters;
  return best_res;
}

}  // namespace mgs_weighting
