// pybind11 bindings of csrc/cpu as mgs_kernels._mgs_cpu.
//
// Every argument is a plain int (data pointers as integers, sizes, strides in elements, dtype codes):
// the module links no torch C++ symbols. mgs_kernels validates the tensors before calling in here.
// The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../csrc/cpu/mgs_cpu.h"
#include "../csrc/mgs_fused_step.h"
#include "fused_step_desc.h"

namespace py = pybind11;

namespace mgs_bind {
void bind_weighting(py::module_& m);  // weighting_bindings.cpp
}  // namespace mgs_bind

namespace {
template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_mgs_cpu, m) {
  m.doc() = "mgs_kernels native CPU kernels (C++/OpenMP); raw-pointer API, see mgs_kernels.backends.cpu_backend";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(mgs_cpu::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(mgs_cpu::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(mgs_cpu::kFloat16);
  m.attr("MAX_TASKS") = static_cast<int64_t>(mgs_cpu::kMaxTasks);
#ifdef _OPENMP
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
  {
    py::dict cols;
    for (const auto& c : mgs_fused::kHyperColumns) cols[c.name] = c.index;
    m.attr("FUSED_CONSTANTS") = cols;  // checked against mgs_kernels._fused_step at load
  }
  m.attr("NO_OUTPUT") = mgs_fused::kNoOutput;
  m.def("isa", &mgs_cpu::isa, "instruction-set clone picked at load time");

  m.def(
      "segmented_gram",
      [](std::uintptr_t grads, int dtype, int64_t T, int64_t row_stride, std::uintptr_t chunk_start,
         std::uintptr_t chunk_len, int64_t num_chunks, std::uintptr_t chunk_first, int64_t M, std::uintptr_t gram,
         int num_threads) {
        py::gil_scoped_release nogil;
        mgs_cpu::segmented_gram(ptr<const void>(grads), dtype, T, row_stride, ptr<const int64_t>(chunk_start),
                                ptr<const int64_t>(chunk_len), num_chunks, ptr<const int64_t>(chunk_first), M,
                                ptr<float>(gram), num_threads);
      },
      py::arg("grads"), py::arg("dtype"), py::arg("T"), py::arg("row_stride"), py::arg("chunk_start"),
      py::arg("chunk_len"), py::arg("num_chunks"), py::arg("chunk_first"), py::arg("M"), py::arg("gram"),
      py::arg("num_threads"));

  m.def(
      "pcgrad_weights",
      [](std::uintptr_t gram, std::uintptr_t order, int64_t M, int64_t T, float eps, std::uintptr_t weights,
         int num_threads) {
        py::gil_scoped_release nogil;
        mgs_cpu::pcgrad_weights(ptr<const float>(gram), ptr<const int64_t>(order), M, T, eps, ptr<float>(weights),
                                num_threads);
      },
      py::arg("gram"), py::arg("order"), py::arg("M"), py::arg("T"), py::arg("eps"), py::arg("weights"),
      py::arg("num_threads"));

  m.def(
      "segmented_combine",
      [](std::uintptr_t grads, int dtype, int64_t T, int64_t row_stride, std::uintptr_t chunk_start,
         std::uintptr_t chunk_len, std::uintptr_t chunk_module, int64_t num_chunks, std::uintptr_t weights,
         std::uintptr_t out, int out_dtype, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_cpu::segmented_combine(ptr<const void>(grads), dtype, T, row_stride, ptr<const int64_t>(chunk_start),
                                   ptr<const int64_t>(chunk_len), ptr<const int64_t>(chunk_module), num_chunks,
                                   ptr<const float>(weights), ptr<void>(out), out_dtype, num_threads);
      },
      py::arg("grads"), py::arg("dtype"), py::arg("T"), py::arg("row_stride"), py::arg("chunk_start"),
      py::arg("chunk_len"), py::arg("chunk_module"), py::arg("num_chunks"), py::arg("weights"), py::arg("out"),
      py::arg("out_dtype"), py::arg("num_threads"));

  m.def(
      "modular_pcgrad",
      [](std::uintptr_t grads, int dtype, int64_t T, int64_t row_stride, std::uintptr_t chunk_start,
         std::uintptr_t chunk_len, std::uintptr_t chunk_module, int64_t num_chunks, std::uintptr_t chunk_first,
         int64_t M, std::uintptr_t order, float eps, std::uintptr_t out, int out_dtype, int num_threads,
         int64_t cache_bytes) {
        py::gil_scoped_release nogil;
        mgs_cpu::modular_pcgrad(ptr<const void>(grads), dtype, T, row_stride, ptr<const int64_t>(chunk_start),
                                ptr<const int64_t>(chunk_len), ptr<const int64_t>(chunk_module), num_chunks,
                                ptr<const int64_t>(chunk_first), M, ptr<const int64_t>(order), eps, ptr<void>(out),
                                out_dtype, num_threads, cache_bytes);
      },
      py::arg("grads"), py::arg("dtype"), py::arg("T"), py::arg("row_stride"), py::arg("chunk_start"),
      py::arg("chunk_len"), py::arg("chunk_module"), py::arg("num_chunks"), py::arg("chunk_first"), py::arg("M"),
      py::arg("order"), py::arg("eps"), py::arg("out"), py::arg("out_dtype"), py::arg("num_threads"),
      py::arg("cache_bytes") = -1,
      "cache_bytes: 0 = two-pass schedule, > 0 = cache-blocked groups of at most that many bytes, "
      "< 0 = auto_cache_bytes(working set)");
  m.def("llc_bytes", &mgs_cpu::llc_bytes, "last-level cache size in bytes (sysconf / sysfs / 8 MiB)");
  m.def("l2_bytes", &mgs_cpu::l2_bytes, "per-core L2 cache size in bytes (sysconf / sysfs / 1 MiB)");
  m.def("default_cache_bytes", &mgs_cpu::default_cache_bytes, py::arg("num_threads") = 0,
        "cache budget of modular_pcgrad's blocked schedule: fraction * min(LLC, L2 x threads)");
  m.def("auto_cache_bytes", &mgs_cpu::auto_cache_bytes, py::arg("working_set_bytes"), py::arg("num_threads") = 0,
        "budget used for cache_bytes < 0: 0 when the working set fits in half the LLC, else default_cache_bytes");

  mgs_bind::bind_weighting(m);
  mgs_bind::bind_fused_step_desc(m);
  m.def(
      "fused_step",
      [](const mgs_fused::StepDesc& desc, int num_threads) {
        py::gil_scoped_release nogil;
        mgs_cpu::fused_step(desc, num_threads);
      },
      py::arg("desc"), py::arg("num_threads"),
      "one fused optimizer step over the slots of desc (a FusedStepDesc of host pointers)");
}
