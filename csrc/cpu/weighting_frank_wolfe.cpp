// MGDA's Frank-Wolfe solver on the CPU: see mgs_weighting.h.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mgs_weighting.h"
#include "weighting_dense.h"

namespace mgs_weighting {

namespace {

// kT > 0: T known at compile time (T <= 8, the loops unroll: about 3x faster at T = 3); kT = 0: any T.
// Same operations in the same order either way.
template <int kT>
void frank_wolfe_one(const double* G, const uint8_t* present, int64_t T_runtime, double epsilon, int64_t max_iters,
                     double* alpha, uint8_t* converged, int64_t* iterations, double* g, double* g_alpha) {
  const int64_t T = kT > 0 ? kT : T_runtime;
  dense::trace_normalize(G, T, g);  // same iterates as on G (the step is a ratio)
  int64_t n = 0;
  for (int64_t k = 0; k < T; ++k) n += present[k] ? 1 : 0;
  for (int64_t k = 0; k < T; ++k) alpha[k] = present[k] ? 1.0 / static_cast<double>(n > 0 ? n : 1) : 0.0;
  bool done = n == 0;
  int64_t iters = 0;
  for (int64_t it = 0; it < max_iters && !done; ++it) {
    for (int64_t i = 0; i < T; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < T; ++j) acc += g[i * T + j] * alpha[j];
      g_alpha[i] = acc;
    }
    int64_t t = -1;
    for (int64_t k = 0; k < T; ++k)
      if (present[k] && (t < 0 || g_alpha[k] < g_alpha[t])) t = k;  // first index of the minimum
    const double a = g_alpha[t];  // alpha^T G e_t
    double b = 0.0;               // alpha^T G alpha
    for (int64_t k = 0; k < T; ++k) b += g_alpha[k] * alpha[k];
    const double c = g[t * T + t];  // e_t^T G e_t
    const double den = b + c - 2.0 * a;
    const double gamma = c <= a ? 1.0 : (b <= a ? 0.0 : (b - a) / (den > 0.0 ? den : 1.0));
    const bool at_vertex = alpha[t] == 1.0;
    for (int64_t k = 0; k < T; ++k) alpha[k] = (1.0 - gamma) * alpha[k] + (k == t ? gamma : 0.0);
    ++iters;
    // Where torchjd stops (gamma < epsilon), or at a vertex the next steps would repeat.
    done = gamma < epsilon || (gamma == 1.0 && at_vertex);
  }
  *converged = done ? 1 : 0;
  *iterations = iters;
}

}  // namespace

void mgda_frank_wolfe(const double* gram, const uint8_t* present, int64_t M, int64_t T, double epsilon,
                      int64_t max_iters, double* weights, uint8_t* converged, int64_t* iterations, int num_threads) {
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (M > 64)
  {
    std::vector<double> g(static_cast<size_t>(T * T)), g_alpha(static_cast<size_t>(T));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const double* G = gram + m * T * T;
      const uint8_t* p = present + m * T;
      double* w = weights + m * T;
      switch (T) {
#define MGS_FW_CASE(K)                                                                                    \
  case K:                                                                                                \
    frank_wolfe_one<K>(G, p, T, epsilon, max_iters, w, converged + m, iterations + m, g.data(), g_alpha.data()); \
    break;
        MGS_FW_CASE(1) MGS_FW_CASE(2) MGS_FW_CASE(3) MGS_FW_CASE(4)
        MGS_FW_CASE(5) MGS_FW_CASE(6) MGS_FW_CASE(7) MGS_FW_CASE(8)
#undef MGS_FW_CASE
        default:
          frank_wolfe_one<0>(G, p, T, epsilon, max_iters, w, converged + m, iterations + m, g.data(), g_alpha.data());
      }
    }
  }
}

}  // namespace mgs_weighting
