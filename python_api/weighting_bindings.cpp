// pybind11 bindings of the native weighting solvers (csrc/cpu/mgs_weighting.h), part of mgs_kernels._mgs_cpu.
//
// Same conventions as mgs_cpu_module.cpp: data pointers as integers, validated by mgs_kernels.weighting
// (float64 contiguous Grams, uint8 masks) before they get here; the GIL is released while a solver runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../csrc/cpu/mgs_weighting.h"
#include "../csrc/cpu/weighting_dense.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

namespace mgs_bind {

void bind_weighting(py::module_& m) {
  m.def(
      "mgda_frank_wolfe",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, double epsilon, int64_t max_iters,
         std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t iterations, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::mgda_frank_wolfe(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, epsilon,
                                        max_iters, ptr<double>(weights), ptr<uint8_t>(converged),
                                        ptr<int64_t>(iterations), num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("epsilon"), py::arg("max_iters"),
      py::arg("weights"), py::arg("converged"), py::arg("iterations"), py::arg("num_threads"),
      "MGDA's Frank-Wolfe weights, torchjd's algorithm per module (float64)");
  m.attr("WEIGHTING_LCP_MAX_TASKS") = static_cast<int64_t>(mgs_weighting::dense::kDenseMax);
  m.def(
      "cagrad",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, double c, double norm_eps, bool torchjd,
         bool auto_reg, double reg_eps, int64_t max_iters, int64_t max_pivots, std::uintptr_t weights,
         std::uintptr_t converged, std::uintptr_t iterations, std::uintptr_t reg, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::cagrad(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, c, norm_eps, torchjd,
                              auto_reg, reg_eps, max_iters, max_pivots, ptr<double>(weights), ptr<uint8_t>(converged),
                              ptr<int64_t>(iterations), ptr<double>(reg), num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("c"), py::arg("norm_eps"),
      py::arg("torchjd"), py::arg("auto_reg"), py::arg("reg_eps"), py::arg("max_iters"), py::arg("max_pivots"),
      py::arg("weights"), py::arg("converged"), py::arg("iterations"), py::arg("reg"), py::arg("num_threads"),
      "CAGrad's weights per module (float64), the algorithm of mgs_kernels/weighting/cagrad.py");
  m.def(
      "dual_cone_projection",
      [](std::uintptr_t gram, std::uintptr_t present, std::uintptr_t U, int64_t M, int64_t R, int64_t T, bool torchjd,
         double norm_eps, bool auto_reg, double reg_eps, int64_t max_pivots, std::uintptr_t V,
         std::uintptr_t converged, std::uintptr_t iterations, std::uintptr_t reg, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::dual_cone_projection(ptr<const double>(gram), ptr<const uint8_t>(present), ptr<const double>(U),
                                            M, R, T, torchjd, norm_eps, auto_reg, reg_eps, max_pivots, ptr<double>(V),
                                            ptr<uint8_t>(converged), ptr<int64_t>(iterations), ptr<double>(reg),
                                            num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("U"), py::arg("M"), py::arg("R"), py::arg("T"), py::arg("torchjd"),
      py::arg("norm_eps"), py::arg("auto_reg"), py::arg("reg_eps"), py::arg("max_pivots"), py::arg("V"),
      py::arg("converged"), py::arg("iterations"), py::arg("reg"), py::arg("num_threads"),
      "UPGrad / DualProj dual-cone projections per module (float64), as mgs_kernels/weighting/_projection.py");
  m.def(
      "mgda_min_norm",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, bool auto_reg, double reg_eps,
         int64_t max_pivots, std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t iterations,
         std::uintptr_t reg, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::mgda_min_norm(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, auto_reg, reg_eps,
                                     max_pivots, ptr<double>(weights), ptr<uint8_t>(converged),
                                     ptr<int64_t>(iterations), ptr<double>(reg), num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("auto_reg"), py::arg("reg_eps"),
      py::arg("max_pivots"), py::arg("weights"), py::arg("converged"), py::arg("iterations"), py::arg("reg"),
      py::arg("num_threads"), "MGDA's exact min-norm point per module (float64), as mgda.py min_norm_point");
  m.def(
      "fairgrad",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, double alpha, int64_t max_iters,
         std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t residual, std::uintptr_t iterations,
         int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::fairgrad(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, alpha, max_iters,
                                ptr<double>(weights), ptr<uint8_t>(converged), ptr<double>(residual),
                                ptr<int64_t>(iterations), num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("alpha"), py::arg("max_iters"),
      py::arg("weights"), py::arg("converged"), py::arg("residual"), py::arg("iterations"), py::arg("num_threads"),
      "FairGrad's weights by damped Newton per module (float64, alpha > 0)");
  m.def(
      "nash_mtl",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, double max_norm, int64_t update_every,
         int64_t max_iters, std::uintptr_t state_alpha, std::uintptr_t state_step, std::uintptr_t weights,
         std::uintptr_t converged, std::uintptr_t residual, std::uintptr_t iterations, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::nash_mtl(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, max_norm, update_every,
                                max_iters, ptr<double>(state_alpha), ptr<int64_t>(state_step), ptr<double>(weights),
                                ptr<uint8_t>(converged), ptr<double>(residual), ptr<int64_t>(iterations),
                                num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("max_norm"), py::arg("update_every"),
      py::arg("max_iters"), py::arg("state_alpha"), py::arg("state_step"), py::arg("weights"), py::arg("converged"),
      py::arg("residual"), py::arg("iterations"), py::arg("num_threads"),
      "Nash-MTL's weights by damped Newton per module, state updated in place (float64)");
  m.def(
      "aligned_mtl",
      [](std::uintptr_t gram, std::uintptr_t pref, int64_t M, int64_t T, int scale_mode, double input_eps,
         std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t rank, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::aligned_mtl(ptr<const double>(gram), ptr<const double>(pref), M, T, scale_mode, input_eps,
                                   ptr<double>(weights), ptr<uint8_t>(converged), ptr<int64_t>(rank), num_threads);
      },
      py::arg("gram"), py::arg("pref"), py::arg("M"), py::arg("T"), py::arg("scale_mode"), py::arg("input_eps"),
      py::arg("weights"), py::arg("converged"), py::arg("rank"), py::arg("num_threads"),
      "Aligned-MTL's weights by Jacobi eigen-decomposition per module (float64)");
  m.def(
      "imtl_g",
      [](std::uintptr_t gram, std::uintptr_t present, int64_t M, int64_t T, bool torchjd, double input_eps,
         std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t rank, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::imtl_g(ptr<const double>(gram), ptr<const uint8_t>(present), M, T, torchjd, input_eps,
                              ptr<double>(weights), ptr<uint8_t>(converged), ptr<int64_t>(rank), num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("M"), py::arg("T"), py::arg("torchjd"), py::arg("input_eps"),
      py::arg("weights"), py::arg("converged"), py::arg("rank"), py::arg("num_threads"),
      "IMTL-G's weights by pseudo-inverse solve per module (float64)");
  m.def(
      "config",
      [](std::uintptr_t gram, std::uintptr_t present, std::uintptr_t pref, int64_t M, int64_t T, double input_eps,
         std::uintptr_t weights, std::uintptr_t converged, std::uintptr_t rank, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_weighting::config(ptr<const double>(gram), ptr<const uint8_t>(present), ptr<const double>(pref), M, T,
                              input_eps, ptr<double>(weights), ptr<uint8_t>(converged), ptr<int64_t>(rank),
                              num_threads);
      },
      py::arg("gram"), py::arg("present"), py::arg("pref"), py::arg("M"), py::arg("T"), py::arg("input_eps"),
      py::arg("weights"), py::arg("converged"), py::arg("rank"), py::arg("num_threads"),
      "ConFIG's weights by pseudo-inverse solve of the cosine matrix per module (float64)");
}

}  // namespace mgs_bind
