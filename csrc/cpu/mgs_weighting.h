// Native CPU solvers of the Gram -> weights stage (mgs_kernels/weighting): the same algorithms as the
// batched torch code beside each method, one module at a time in scalar float64.
//
// Why: the torch code runs every module's problem as a batch of [M, T, T] tensor ops, which is what a GPU
// wants (no host sync, fixed iteration counts with masks), but on the CPU each of its ~1000 small ops costs
// 5-10 us of dispatch, more than the arithmetic of all M problems together. Here one OpenMP thread solves a
// module start to finish in registers and L1 (T <= kMaxTasks).
//
// Conventions, shared by every function below:
//   gram     [M, T, T] float64, symmetric and finite (mgs_kernels.weighting.base.Weighting.__call__ makes it so:
//            a module with a non-finite entry arrives as all zeros with no task present);
//   present  [M, T] uint8 (torch.bool): task k is in module m's problem (G[m, k, k] > 0);
//   weights  [M, T] float64 out; converged [M] uint8 out; iterations [M] int64 out.
// Every output element of every module is written. Modules are independent: results do not depend on
// the thread count (static schedule, no reductions across modules).
#pragma once
#include <cstdint>

namespace mgs_weighting {

// MGDA by Frank-Wolfe, torchjd's algorithm step for step (mgs_kernels/weighting/mgda.py
// MGDAWeighting._frank_wolfe): on G / tr G, alpha starts at 1/n on the present tasks; each step moves
// towards the present vertex t = argmin (G alpha)_t (first index on ties) by the exact line-search
// step gamma, and a module stops when gamma < epsilon or a gamma = 1 step towards the vertex it is on.
void mgda_frank_wolfe(const double* gram, const uint8_t* present, int64_t M, int64_t T, double epsilon,
                      int64_t max_iters, double* weights, uint8_t* converged, int64_t* iterations, int num_threads);

// The QP-based methods below solve their LCPs with weighting_lcp.h (solve_lcp "auto" of _qp.py as it runs on
// the CPU) and take 1 <= T <= 10 (std::invalid_argument otherwise; the torch code handles larger T).
// auto_reg: the regularisation delta per module by auto_regularization of the cosine matrix, else reg_eps.
// reg [M] float64 out: the delta used. max_pivots: cap of the pivoting solver (resolved by the caller).

// CAGrad (mgs_kernels/weighting/cagrad.py CAGradWeighting.compute): c, norm_eps, torchjd (compat="torchjd"),
// max_iters (QPs per module); iterations [M] = QPs solved, converged [M] = the t-iteration's fixed point.
void cagrad(const double* gram, const uint8_t* present, int64_t M, int64_t T, double c, double norm_eps,
            bool torchjd, bool auto_reg, double reg_eps, int64_t max_iters, int64_t max_pivots, double* weights,
            uint8_t* converged, int64_t* iterations, double* reg, int num_threads);

// The projections of UPGrad / DualProj (mgs_kernels/weighting/_projection.py project_dual_cone): for the R
// preference rows U [M, R, T] float64, the weights V [M, R, T] float64 out of each row's projection onto the
// dual cone. torchjd: compat="torchjd" (G / tr G, zero below norm_eps, plus reg_eps I; reg is then reg_eps).
// converged [M]: every row's LCP; iterations [M]: the most pivots of a row.
void dual_cone_projection(const double* gram, const uint8_t* present, const double* U, int64_t M, int64_t R,
                          int64_t T, bool torchjd, double norm_eps, bool auto_reg, double reg_eps, int64_t max_pivots,
                          double* V, uint8_t* converged, int64_t* iterations, double* reg, int num_threads);

// MGDA's exact min-norm point (mgs_kernels/weighting/mgda.py min_norm_point): weights [M, T] on the simplex;
// iterations [M] = pivots.
void mgda_min_norm(const double* gram, const uint8_t* present, int64_t M, int64_t T, bool auto_reg, double reg_eps,
                   int64_t max_pivots, double* weights, uint8_t* converged, int64_t* iterations, double* reg,
                   int num_threads);
// FairGrad, alpha > 0 (mgs_kernels/weighting/fairgrad.py): damped Newton (weighting_newton.h) for
// G w = w^(-1/alpha) on G / tr G, rescaled by tr G^(-alpha / (alpha + 1)); zero weights where the residual
// stays above 1e-9 (converged 0). residual [M] float64 out: the solve's residual (on G / tr G).
void fairgrad(const double* gram, const uint8_t* present, int64_t M, int64_t T, double alpha, int64_t max_iters,
              double* weights, uint8_t* converged, double* residual, int64_t* iterations, int num_threads);

// Nash-MTL (mgs_kernels/weighting/nash_mtl.py): where state_step % update_every == 0 and a task is present,
// damped Newton for w_i (G w)_i = 1 warm-started from state_alpha, zero where unsolved; else the state's
// weights (converged 1, residual 0, iterations 0). state_alpha [M, T] float64 and state_step [M] int64 are
// updated in place (the weights before the clip; step + 1); weights = state_alpha scaled down so that
// sqrt(W^T G W) <= max_norm (max_norm 0: no clip).
void nash_mtl(const double* gram, const uint8_t* present, int64_t M, int64_t T, double max_norm,
              int64_t update_every, int64_t max_iters, double* state_alpha, int64_t* state_step, double* weights,
              uint8_t* converged, double* residual, int64_t* iterations, int num_threads);

// Aligned-MTL (mgs_kernels/weighting/aligned_mtl.py): pref [M, T] float64 the preference weights u (0 on
// absent tasks); scale_mode 0 min, 1 median (lower, as torch.median), 2 rmse; input_eps the unit roundoff
// of the Gram's input dtype (rank cut-off T * input_eps * the largest eigenvalue of G / tr G).
// converged [M] uint8 out: the Jacobi sweeps converged; rank [M] int64 out: eigenvalues kept.
void aligned_mtl(const double* gram, const double* pref, int64_t M, int64_t T, int scale_mode, double input_eps,
                 double* weights, uint8_t* converged, int64_t* rank, int num_threads);

// The pseudo-inverse methods (weighting_spectral.h: _spectral.pinv_solve as it runs on the CPU, a Cholesky
// solve on safely full-rank modules, else Jacobi with the cut-off T * input_eps * the largest |eigenvalue|).
// converged [M] uint8 out: the Jacobi sweeps converged (1 on the Cholesky path); rank [M] int64 out.
// IMTL-G (imtl_g.py): torchjd (compat="torchjd") tests |sum v| >= 1e-12 on G instead of G / tr G.
void imtl_g(const double* gram, const uint8_t* present, int64_t M, int64_t T, bool torchjd, double input_eps,
            double* weights, uint8_t* converged, int64_t* rank, int num_threads);
// ConFIG (config.py): pref [M, T] float64 the preference weights p (0 on absent tasks).
void config(const double* gram, const uint8_t* present, const double* pref, int64_t M, int64_t T, double input_eps,
            double* weights, uint8_t* converged, int64_t* rank, int num_threads);

}  // namespace mgs_weighting
