// pybind11 binding of mgs_fused::StepDesc (csrc/mgs_fused_step.h), shared by _mgs_cpu and _mgs_cuda.
//
// Each module binds its own module-local class FusedStepDesc (both modules may be loaded in one process);
// mgs_kernels._native.fused_step_args builds the one of the module that runs the step. Pointer fields are
// plain ints (data_ptr() values), as everywhere in the raw-pointer API.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/mgs_fused_step.h"

namespace mgs_bind {

namespace py = pybind11;

#define MGS_DESC_PTR(NAME, TYPE)                                                                      \
  def_property(                                                                                       \
      #NAME, [](const mgs_fused::StepDesc& d) { return reinterpret_cast<std::uintptr_t>(d.NAME); }, \
      [](mgs_fused::StepDesc& d, std::uintptr_t v) { d.NAME = reinterpret_cast<TYPE>(v); })

inline void bind_fused_step_desc(py::module_& m) {
  py::class_<mgs_fused::StepDesc>(m, "FusedStepDesc", py::module_local(),
                                  "All arguments of one fused optimizer step launch (csrc/mgs_fused_step.h)")
      .def(py::init<>())
      .MGS_DESC_PTR(grads, const void*)
      .def_readwrite("dtype", &mgs_fused::StepDesc::dtype)
      .def_readwrite("T", &mgs_fused::StepDesc::T)
      .def_readwrite("row_stride", &mgs_fused::StepDesc::row_stride)
      .MGS_DESC_PTR(chunk_start, const int64_t*)
      .MGS_DESC_PTR(chunk_len, const int64_t*)
      .MGS_DESC_PTR(chunk_slot, const int64_t*)
      .MGS_DESC_PTR(slot_first, const int64_t*)
      .def_readwrite("num_chunks", &mgs_fused::StepDesc::num_chunks)
      .def_readwrite("num_slots", &mgs_fused::StepDesc::num_slots)
      .MGS_DESC_PTR(active, const int32_t*)
      .MGS_DESC_PTR(slot_weights, const float*)
      .MGS_DESC_PTR(param_ptr, const int64_t*)
      .MGS_DESC_PTR(state1_ptr, const int64_t*)
      .MGS_DESC_PTR(state2_ptr, const int64_t*)
      .MGS_DESC_PTR(state3_ptr, const int64_t*)
      .MGS_DESC_PTR(hyper, const float*)
      .MGS_DESC_PTR(grad_out, void*)
      .def_readwrite("out_dtype", &mgs_fused::StepDesc::out_dtype)
      .def_readwrite("kind", &mgs_fused::StepDesc::kind)
      .def("__repr__", [](const mgs_fused::StepDesc& d) {
        return "FusedStepDesc(kind=" + std::to_string(d.kind) + ", dtype=" + std::to_string(d.dtype) +
               ", T=" + std::to_string(d.T) + ", num_chunks=" + std::to_string(d.num_chunks) +
               ", num_slots=" + std::to_string(d.num_slots) + ", out_dtype=" + std::to_string(d.out_dtype) + ")";
      });
}

#undef MGS_DESC_PTR

}  // namespace mgs_bind
