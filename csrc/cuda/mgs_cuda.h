// Native CUDA kernels of mgs_kernels: plain C++ interface (no CUDA, Python or torch headers), so that the
// pybind11 binding is compiled by the host compiler and the module links no torch symbols.
//
// Every function enqueues work on `stream` (a cudaStream_t passed as void*, normally torch's current
// stream) on the CURRENT device, never synchronises, checks every CUDA call and returns "" on success or
// an error message. Scratch memory (partials) is allocated by the caller (torch's caching allocator).
#pragma once
#include <cstdint>
#include <string>

#include "../mgs_fused_step.h"

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

// order[M, T, T-1]: an entry outside [0, T) or equal to the visiting task itself is skipped (as on the CPU).
std::string pcgrad_weights(const float* gram, const int64_t* order, int64_t M, int64_t T, float eps, float* weights,
                           void* stream);

std::string segmented_combine(const void* grads, int dtype, int64_t T, int64_t row_stride,
                              const int64_t* chunk_start, const int64_t* chunk_len, const int64_t* chunk_module,
                              int64_t num_chunks, const float* weights, void* out, int out_dtype, void* stream);

// Fused optimizer step: the contract of mgs_cpu::fused_step (csrc/cpu/mgs_cpu.h) on a descriptor of device
// pointers (every table and the param / state pointer arrays live on the device). One block per chunk; no
// host sync.
std::string fused_step(const mgs_fused::StepDesc& desc, void* stream);

// Runtime / driver versions, device count and compiled architectures, for diagnostics (never fails).
std::string runtime_info();

// The architectures compiled into this module ("sm_80,sm_90").
std::string compiled_archs();

// "" when this module can run here: a driver new enough for the statically linked runtime, at least one
// visible device, and a device whose architecture has code in this module. Otherwise why not. Creates no
// context (version and attribute queries only).
std::string runtime_error();

// "" when device `index` exists and has code in this module (no context is created), else why not.
std::string device_error(int64_t index);

// Runs a tiny kernel on device `index` and checks its result (creates the primary context there, and
// synchronises): "" on success, else the CUDA error. The current device is restored.
std::string probe_device(int64_t index);

}  // namespace mgs_cuda
