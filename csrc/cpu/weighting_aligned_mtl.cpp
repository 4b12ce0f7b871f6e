// Aligned-MTL's weights on the CPU (mgs_kernels/weighting/aligned_mtl.py AlignedMTLWeighting.compute):
// the Jacobi eigen-decomposition (weighting_jacobi.h) of G / tr G, the eigenvalues kept above
// T * input_eps * the largest, and W = sqrt(scale) V_r Lambda_r^-1/2 V_r^T u (u where none is kept).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "mgs_weighting.h"
#include "weighting_dense.h"
#include "weighting_jacobi.h"

namespace mgs_weighting {

void aligned_mtl(const double* gram, const double* pref, int64_t M, int64_t T, int scale_mode, double input_eps,
                 double* weights, uint8_t* converged, int64_t* rank, int num_threads) {
  const JacobiSchedule schedule(T);
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    const size_t TT = static_cast<size_t>(T * T), T_ = static_cast<size_t>(T);
    std::vector<double> g(TT), V(TT), a(TT), lam(T_), coef(T_), y(T_), sorted(T_);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      const double* u = pref + m * T;
      double* w = weights + m * T;
      dense::trace_normalize(G, T, g.data());
      converged[m] = jacobi_eig(g.data(), T, schedule, 10, 1e-15, lam.data(), V.data(), a.data()) ? 1 : 0;
      double top = -std::numeric_limits<double>::infinity();
      for (size_t k = 0; k < T_; ++k) top = std::max(top, lam[k]);
      const double cut = (static_cast<double>(T) * input_eps) * top;
      int64_t r = 0;
      double sum = 0.0;
      for (size_t k = 0; k < T_; ++k) {
        const bool kept = lam[k] > cut;
        coef[k] = kept ? 1.0 / std::sqrt(lam[k]) : 0.0;
        sorted[k] = kept ? lam[k] : std::numeric_limits<double>::infinity();
        sum += kept ? lam[k] : 0.0;
        r += kept ? 1 : 0;
      }
      rank[m] = r;
      if (r == 0) {  // B = I
        for (int64_t k = 0; k < T; ++k) w[k] = u[k];
        continue;
      }
      double scale;
      if (scale_mode == 2) {  // rmse: the mean kept eigenvalue
        scale = sum / static_cast<double>(r);
      } else {  // min, or the lower median (torch.median)
        std::sort(sorted.begin(), sorted.end());
        scale = sorted[static_cast<size_t>(scale_mode == 0 ? 0 : (r - 1) / 2)];
      }
      // V diag(coef) V^T u
      for (int64_t j = 0; j < T; ++j) {
        double acc = 0.0;
        for (int64_t i = 0; i < T; ++i) acc += V[static_cast<size_t>(i * T + j)] * u[i];
        y[static_cast<size_t>(j)] = coef[static_cast<size_t>(j)] * acc;
      }
      const double root = std::sqrt(scale);
      for (int64_t i = 0; i < T; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < T; ++j) acc += V[static_cast<size_t>(i * T + j)] * y[static_cast<size_t>(j)];
        w[i] = root * acc;
      }
    }
  }
}

}  // namespace mgs_weighting
