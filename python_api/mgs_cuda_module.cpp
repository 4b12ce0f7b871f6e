// pybind11 bindings of csrc/cuda as mgs_kernels._mgs_cuda.
//
// Compiled by the host compiler: no CUDA, Python-C++ torch or c10 headers. Every argument is a plain int
// (data pointers, sizes, row stride in elements, dtype codes, the cudaStream_t as an int). Kernels are
// enqueued on that stream on the current device (mgs_kernels sets it); nothing synchronises. A failed
// CUDA call raises RuntimeError with the CUDA error name and text.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../csrc/cuda/mgs_cuda.h"
#include "../csrc/mgs_fused_step.h"
#include "fused_step_desc.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}
}  // namespace

PYBIND11_MODULE(_mgs_cuda, m) {
  m.doc() = "mgs_kernels native CUDA kernels; raw-pointer API, see mgs_kernels.backends.cuda_backend";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(mgs_cuda::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(mgs_cuda::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(mgs_cuda::kFloat16);
  m.attr("MAX_TASKS") = static_cast<int64_t>(mgs_cuda::kMaxTasks);
  {
    py::dict cols;
    for (const auto& c : mgs_fused::kHyperColumns) cols[c.name] = c.index;
    m.attr("FUSED_CONSTANTS") = cols;  // checked against mgs_kernels._fused_step at load
  }
  m.attr("NO_OUTPUT") = mgs_fused::kNoOutput;
  m.def("chunk_elems", &mgs_cuda::chunk_elems, py::arg("T"));
  m.def("partial_size", &mgs_cuda::partial_size, py::arg("T"));
  m.def("runtime_info", &mgs_cuda::runtime_info, "runtime / driver versions, device count, architectures");
  m.def("compiled_archs", &mgs_cuda::compiled_archs, "the architectures compiled into this module");
  m.def("runtime_error", &mgs_cuda::runtime_error,
        "'' when the module can run here (driver, devices, architectures), else why not; creates no context");
  m.def("device_error", &mgs_cuda::device_error, py::arg("index"),
        "'' when device index exists and has code in this module, else why not; creates no context");
  m.def("probe_device", &mgs_cuda::probe_device, py::arg("index"),
        "run a tiny kernel on device index (creates its context, synchronises): '' or the CUDA error");

  m.def(
      "segmented_gram",
      [](std::uintptr_t grads, int dtype, int64_t T, int64_t row_stride, std::uintptr_t chunk_start,
         std::uintptr_t chunk_len, int64_t num_chunks, std::uintptr_t chunk_first, int64_t M,
         std::uintptr_t partials, std::uintptr_t gram, std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = mgs_cuda::segmented_gram(ptr<const void>(grads), dtype, T, row_stride, ptr<const int64_t>(chunk_start),
                                         ptr<const int64_t>(chunk_len), num_chunks, ptr<const int64_t>(chunk_first), M,
                                         ptr<float>(partials), ptr<float>(gram), ptr<void>(stream));
        }
        check(err);
      },
      py::arg("grads"), py::arg("dtype"), py::arg("T"), py::arg("row_stride"), py::arg("chunk_start"),
      py::arg("chunk_len"), py::arg("num_chunks"), py::arg("chunk_first"), py::arg("M"), py::arg("partials"),
      py::arg("gram"), py::arg("stream"));

  m.def(
      "pcgrad_weights",
      [](std::uintptr_t gram, std::uintptr_t order, int64_t M, int64_t T, float eps, std::uintptr_t weights,
         std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = mgs_cuda::pcgrad_weights(ptr<const float>(gram), ptr<const int64_t>(order), M, T, eps,
                                         ptr<float>(weights), ptr<void>(stream));
        }
        check(err);
      },
      py::arg("gram"), py::arg("order"), py::arg("M"), py::arg("T"), py::arg("eps"), py::arg("weights"),
      py::arg("stream"));

  m.def(
      "segmented_combine",
      [](std::uintptr_t grads, int dtype, int64_t T, int64_t row_stride, std::uintptr_t chunk_start,
         std::uintptr_t chunk_len, std::uintptr_t chunk_module, int64_t num_chunks, std::uintptr_t weights,
         std::uintptr_t out, int out_dtype, std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = mgs_cuda::segmented_combine(ptr<const void>(grads), dtype, T, row_stride,
                                            ptr<const int64_t>(chunk_start), ptr<const int64_t>(chunk_len),
                                            ptr<const int64_t>(chunk_module), num_chunks, ptr<const float>(weights),
                                            ptr<void>(out), out_dtype, ptr<void>(stream));
        }
        check(err);
      },
      py::arg("grads"), py::arg("dtype"), py::arg("T"), py::arg("row_stride"), py::arg("chunk_start"),
      py::arg("chunk_len"), py::arg("chunk_module"), py::arg("num_chunks"), py::arg("weights"), py::arg("out"),
      py::arg("out_dtype"), py::arg("stream"));

  mgs_bind::bind_fused_step_desc(m);
  m.def(
      "fused_step",
      [](const mgs_fused::StepDesc& desc, std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = mgs_cuda::fused_step(desc, ptr<void>(stream));
        }
        check(err);
      },
      py::arg("desc"), py::arg("stream"),
      "one fused optimizer step over the slots of desc (a FusedStepDesc of device pointers), on stream");
}
