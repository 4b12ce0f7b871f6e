// A^+ x for one module, as mgs_kernels/weighting/_spectral.py pinv_solve computes it on the CPU: a Cholesky
// solve where A is safely full-rank on its present tasks, else the Jacobi eigen-decomposition
// (weighting_jacobi.h) with the eigenvalues kept above T * input_eps * the largest magnitude. Internal to
// the native weighting solvers (csrc/cpu/weighting_spectral.cpp: imtl_g, config).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "weighting_jacobi.h"

namespace mgs_weighting {

// Per-thread buffers of pinv_solve_one for T tasks.
struct PinvScratch {
  explicit PinvScratch(int64_t T)
      : L(static_cast<size_t>(T * T)), V(L), a(L), lam(static_cast<size_t>(T)), y(lam) {}
  std::vector<double> L, V, a, lam, y;
};

// A [T, T] float64 symmetric positive semi-definite, rows and columns of absent tasks zero; present [T] uint8;
// x [T] float64, zero on absent tasks. out [T] float64: A^+ x (0 on absent tasks). *converged: the Jacobi
// sweeps converged (1 on the Cholesky path); *rank: the eigenvalues kept (the present tasks on the Cholesky
// path), both written.
void pinv_solve_one(const double* A, const uint8_t* present, const double* x, int64_t T, double input_eps,
                    const JacobiSchedule& schedule, double* out, uint8_t* converged, int64_t* rank,
                    PinvScratch& scratch);

}  // namespace mgs_weighting
