// Native CUDA kernels of mgs_kernels: plain C++ interface (no CUDA, Python or torch headers), so that the
// pybind11 binding is compiled by the host compiler and the module links no torch symbols.
//
// Every function enqueues work on `stream` (a cudaStream_t passed as void*, normally torch's current
// stream) on the CURRENT device, never synchronises, checks every CUDA call and returns "" on success or
// an error message. Scratch memory (partials) is allocated by the caller (torch's caching allocator).
#pragma once
#include <cstdint>
#include <string>

namespace mgs_cuda {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int64_t kMaxTasks = 64;

// Elements per chunk the chunk table must use for T tasks (the Gram kernels assume nothing else, but
// this is the size they are tuned for).
int64_t chunk_elems(int64_t T);

// Packed upper-triangle entries per chunk partial: T (T + 1) / 2.
inline int64_t partial_size(int64_t T) { return T * (T + 1) / 2; }

// gram[M, T, T] from grads; partials must hold num_chunks * partial_size(T) floats.
std::string segmented_gram(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                           const int64_t* chunk_len, int64_t num_chunks, const int64_t* chunk_first, int64_t M,
                           float* partials, float* gram, void* stream);

std::string pcgrad_weights(const float* gram, const int64_t* order, int64_t M, int64_t T, float eps, float* weights,
                           void* stream);

std::string segmented_combine(const void* grads, int dtype, int64_t T, int64_t row_stride,
                              const int64_t* chunk_start, const int64_t* chunk_len, const int64_t* chunk_module,
                              int64_t num_chunks, const float* weights, void* out, int out_dtype, void* stream);

// Fused optimizer step: the contract of mgs_cpu::fused_step (csrc/cpu/mgs_cpu.h) on device pointers (every
// table and the param / state pointer arrays live on the device). One block per chunk; no host sync.
std::string fused_step(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                       const int64_t* chunk_len, const int64_t* chunk_slot, const int64_t* slot_first,
                       int64_t num_chunks, int64_t S, const int32_t* active, const float* slot_weights,
                       const int64_t* param_ptr, const int64_t* state1_ptr, const int64_t* state2_ptr,
                       const int64_t* state3_ptr, const float* hyper, void* grad_out, int out_dtype, int kind,
                       void* stream);

// Runtime / driver versions and device count, for diagnostics ("" fields on error).
std::string runtime_info();

}  // namespace mgs_cuda
