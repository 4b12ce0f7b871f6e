// Nash-MTL's weights on the CPU (mgs_kernels/weighting/nash_mtl.py NashMTLWeighting.compute): damped
// Newton (weighting_newton.h, a = 1) on G / tr G warm-started from the state, every update_every-th call,
// then the max_norm clip. The state is updated in place exactly as the torch code updates it.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mgs_weighting.h"
#include "weighting_dense.h"
#include "weighting_newton.h"

namespace mgs_weighting {

void nash_mtl(const double* gram, const uint8_t* present, int64_t M, int64_t T, double max_norm,
              int64_t update_every, int64_t max_iters, double* state_alpha, int64_t* state_step, double* weights,
              uint8_t* converged, double* residual, int64_t* iterations, int num_threads) {
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    NewtonScratch scratch(T);
    std::vector<double> g(static_cast<size_t>(T * T)), w0(static_cast<size_t>(T)), w(w0);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      const uint8_t* p = present + m * T;
      double* alpha = state_alpha + m * T;
      bool any = false;
      for (int64_t k = 0; k < T; ++k) any = any || p[k] != 0;
      // A module with no task present (empty, or non-finite: see Weighting.__call__) keeps its weights.
      const bool solve_now = state_step[m] % update_every == 0 && any;
      if (solve_now) {
        const double root = std::sqrt(dense::trace_divisor(dense::trace_normalize(G, T, g.data())));
        // On G / tr G the solution is sqrt(tr G) times the one on G.
        for (int64_t k = 0; k < T; ++k) w0[static_cast<size_t>(k)] = alpha[k] * root;
        const double res = alpha_fair_one(g.data(), p, T, 1.0, max_iters, w0.data(), w.data(), iterations + m,
                                          scratch);
        const bool ok = res <= 1e-9;
        // (a zeroed module starts cold at its next solve)
        for (int64_t k = 0; k < T; ++k) alpha[k] = ok ? w[static_cast<size_t>(k)] / root : 0.0;
        converged[m] = ok ? 1 : 0;
        residual[m] = res;
      } else {
        converged[m] = 1;
        residual[m] = 0.0;
        iterations[m] = 0;
      }
      state_step[m] += 1;
      // Clip |J^T W| = sqrt(W^T G W) (on the present tasks) to max_norm.
      double shrink = 1.0;
      if (max_norm > 0.0) {
        double q = 0.0;
        for (int64_t i = 0; i < T; ++i) {
          double acc = 0.0;
          for (int64_t j = 0; j < T; ++j) acc += G[i * T + j] * (p[j] ? alpha[j] : 0.0);
          q += acc * (p[i] ? alpha[i] : 0.0);
        }
        const double norm = std::sqrt(q < 0.0 ? 0.0 : q);
        shrink = norm > max_norm ? max_norm / (norm > 0.0 ? norm : 1.0) : 1.0;
      }
      for (int64_t k = 0; k < T; ++k) weights[m * T + k] = max_norm > 0.0 ? alpha[k] * shrink : alpha[k];
    }
  }
}

}  // namespace mgs_weighting
