// Symmetric eigen-decomposition of one small matrix by cyclic Jacobi rotations: the algorithm of
// mgs_kernels/weighting/_eig.py sym_eig (same round-robin pair schedule, rotations, stopping test and
// sweep cap) for one module. Internal to the native weighting solvers (csrc/cpu/weighting_aligned_mtl.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mgs_weighting {

// The round-robin schedule of sym_eig for T tasks: per round, the disjoint pairs (p, q), p < q, rotated
// together (pairs with the dummy index of odd T are left out: their rotation is the identity).
struct JacobiSchedule {
  explicit JacobiSchedule(int64_t T);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
};

// Eigen-decomposition of the symmetric part of A [T, T] float64: A = V diag(lam) V^T.
//   lam [T] float64 out (unordered), V [T, T] float64 out (row-major, column j the eigenvector of lam[j]);
//   a [T, T] float64 scratch. Returns whether the off-diagonal part fell below rtol |A|_F (max_sweeps sweeps).
bool jacobi_eig(const double* A, int64_t T, const JacobiSchedule& schedule, int max_sweeps, double rtol, double* lam,
                double* V, double* a);

}  // namespace mgs_weighting
