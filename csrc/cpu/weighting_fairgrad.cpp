// FairGrad's weights on the CPU (mgs_kernels/weighting/fairgrad.py FairGradWeighting.compute, alpha > 0):
// damped Newton (weighting_newton.h) on G / tr G, rescaled by tr G^(-alpha / (alpha + 1)); a module whose
// solve did not converge (residual > 1e-9: Pareto stationary) gets zero weights (_newton.unsolved_to_zero).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mgs_weighting.h"
#include "weighting_dense.h"
#include "weighting_newton.h"

namespace mgs_weighting {

void fairgrad(const double* gram, const uint8_t* present, int64_t M, int64_t T, double alpha, int64_t max_iters,
              double* weights, uint8_t* converged, double* residual, int64_t* iterations, int num_threads) {
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    NewtonScratch scratch(T);
    std::vector<double> g(static_cast<size_t>(T * T));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      const double s = dense::trace_divisor(dense::trace_normalize(G, T, g.data()));
      double* w = weights + m * T;
      const double res = alpha_fair_one(g.data(), present + m * T, T, alpha, max_iters, nullptr, w, iterations + m,
                                        scratch);
      const bool ok = res <= 1e-9;
      const double scale = std::pow(s, -alpha / (alpha + 1.0));
      for (int64_t k = 0; k < T; ++k) w[k] = ok ? w[k] * scale : 0.0;
      converged[m] = ok ? 1 : 0;
      residual[m] = res;
    }
  }
}

}  // namespace mgs_weighting
