// Damped Newton for the alpha-fair bargaining weights of FairGrad and Nash-MTL, one module at a time:
// the algorithm of mgs_kernels/weighting/_newton.py alpha_fair step for step (see there for the why).
// Internal to the native weighting solvers (csrc/cpu/weighting_fairgrad.cpp, weighting_nash_mtl.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mgs_weighting {

// Per-thread scratch of alpha_fair_one, sized for T tasks once per thread.
struct NewtonScratch {
  explicit NewtonScratch(int64_t T);
  std::vector<double> w, gw, best, ws, hp, grad, delta, gd, hess, chol;
};

// Solves G w = w^(-1/a) on the present tasks of one module.
//   g        [T, T] float64, symmetric (callers pass G / tr G);
//   present  [T] uint8; w0 [T] float64 warm start, or nullptr (used only where valid, as in diagonal_start);
//   out      [T] float64: the best iterate times the present mask (absent tasks 0);
//   iterations: Newton steps taken (int64).
// Returns the residual max_i |w_i^(1/a) (G w)_i - 1| of ``out`` over the present tasks (0 for an empty module).
double alpha_fair_one(const double* g, const uint8_t* present, int64_t T, double a, int64_t max_iters,
                      const double* w0, double* out, int64_t* iterations, NewtonScratch& s);

}  // namespace mgs_weighting
