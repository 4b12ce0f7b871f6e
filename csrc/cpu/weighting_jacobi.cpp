// Cyclic Jacobi eigen-decomposition of one module: see weighting_jacobi.h. The torch code rotates the
// T/2 pairs of a round at once (rotation angles from the matrix before the round, then all row
// rotations, then all column rotations); the pairs are disjoint, so doing the same pair by pair in the
// original index order is the same arithmetic without permuting the matrix.
#include "weighting_jacobi.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace mgs_weighting {

JacobiSchedule::JacobiSchedule(int64_t T) {
  const int64_t n = T + (T % 2);
  std::vector<int64_t> players(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) players[static_cast<size_t>(i)] = i;
  for (int64_t r = 0; r + 1 < n; ++r) {  // _eig._schedule: the circle method
    std::vector<std::pair<int64_t, int64_t>> pairs;
    for (int64_t i = 0; i < n / 2; ++i) {
      int64_t p = players[static_cast<size_t>(i)], q = players[static_cast<size_t>(n - 1 - i)];
      if (p > q) std::swap(p, q);
      if (q < T) pairs.emplace_back(p, q);  // a pair with the dummy index T never rotates
    }
    rounds.push_back(pairs);
    std::vector<int64_t> next{players[0], players[static_cast<size_t>(n - 1)]};
    for (int64_t i = 1; i + 1 < n; ++i) next.push_back(players[static_cast<size_t>(i)]);
    players = next;
  }
}

namespace {

// Off-diagonal and total squared Frobenius norms of a [T, T].
void norms(const double* a, int64_t T, double* off2, double* all2) {
  double o = 0.0, s = 0.0;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) {
      const double x = a[i * T + j] * a[i * T + j];
      s += x;
      if (i != j) o += x;
    }
  *off2 = o;
  *all2 = s;
}

}  // namespace

bool jacobi_eig(const double* A, int64_t T, const JacobiSchedule& schedule, int max_sweeps, double rtol, double* lam,
                double* V, double* a) {
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) {
      a[i * T + j] = 0.5 * (A[i * T + j] + A[j * T + i]);
      V[i * T + j] = i == j ? 1.0 : 0.0;
    }
  double off2 = 0.0, all2 = 0.0;
  norms(a, T, &off2, &all2);
  const double scale2 = all2 * (rtol * rtol);
  bool done = false;
  std::vector<double> cs(static_cast<size_t>(2 * T));
  for (int sweep = 0; sweep < max_sweeps && T > 1; ++sweep) {
    norms(a, T, &off2, &all2);
    if (off2 <= scale2) {
      done = true;
      break;
    }
    for (const auto& pairs : schedule.rounds) {
      // Symmetric Schur 2x2 (Golub & Van Loan 8.4.1) per pair, from the matrix before the round.
      for (size_t k = 0; k < pairs.size(); ++k) {
        const int64_t p = pairs[k].first, q = pairs[k].second;
        const double app = a[p * T + p], aqq = a[q * T + q], apq = a[p * T + q];
        double c = 1.0, s = 0.0;
        if (apq != 0.0) {
          const double tau = (aqq - app) / (2.0 * apq);
          const double t = (tau >= 0.0 ? 1.0 : -1.0) / (std::fabs(tau) + std::hypot(1.0, tau));
          c = 1.0 / std::sqrt(1.0 + t * t);
          s = t * c;
        }
        cs[2 * k] = c;
        cs[2 * k + 1] = s;
      }
      for (size_t k = 0; k < pairs.size(); ++k) {  // J^T A: rows p, q
        const int64_t p = pairs[k].first, q = pairs[k].second;
        const double c = cs[2 * k], s = cs[2 * k + 1];
        for (int64_t j = 0; j < T; ++j) {
          const double r0 = a[p * T + j], r1 = a[q * T + j];
          a[p * T + j] = r0 * c - r1 * s;
          a[q * T + j] = r0 * s + r1 * c;
        }
      }
      for (size_t k = 0; k < pairs.size(); ++k) {  // (J^T A) J and V J: columns p, q
        const int64_t p = pairs[k].first, q = pairs[k].second;
        const double c = cs[2 * k], s = cs[2 * k + 1];
        for (int64_t i = 0; i < T; ++i) {
          double r0 = a[i * T + p], r1 = a[i * T + q];
          a[i * T + p] = r0 * c - r1 * s;
          a[i * T + q] = r0 * s + r1 * c;
          r0 = V[i * T + p];
          r1 = V[i * T + q];
          V[i * T + p] = r0 * c - r1 * s;
          V[i * T + q] = r0 * s + r1 * c;
        }
      }
    }
  }
  if (!done) {
    norms(a, T, &off2, &all2);
    done = off2 <= scale2 || T == 1;
  }
  for (int64_t k = 0; k < T; ++k) lam[k] = a[k * T + k];
  return done;
}

}  // namespace mgs_weighting
