// Native CPU kernels of mgs_kernels: segmented Gram, batched PCGrad solve, segmented combine.
//
// Plain C++17 + OpenMP, no Python and no torch headers. Callers pass raw pointers (validated by the
// Python layer) and the chunk table of mgs_kernels._plan.ChunkTable: every module split into chunks
// that never cross a module boundary, sorted by module.
//
// Storage dtype codes (kept in sync with mgs_kernels._native.DTYPE_CODES, checked at import).
#pragma once
#include <cstdint>

#include "../mgs_fused_step.h"

namespace mgs_cpu {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int64_t kMaxTasks = 64;

// gram[M, T, T] (float32, symmetric) = per-module V_m V_m^T. grads element (t, n) is at
// grads + (t * row_stride + n) * elemsize. Chunk k covers [chunk_start[k], chunk_start[k] + chunk_len[k]);
// chunks of module m are chunk_first[m] .. chunk_first[m+1]-1.
// Deterministic: each chunk's partial is computed by one thread with a fixed blocking, then the
// partials of each module are summed (in double) in chunk order -> independent of the thread count.
void segmented_gram(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                    const int64_t* chunk_len, int64_t num_chunks, const int64_t* chunk_first, int64_t M,
                    float* gram, int num_threads);

// weights[M, T] (float32) from gram[M, T, T] and order[M, T, T-1] (int64): DESIGN.md section 1. An order
// entry outside [0, T) or equal to the visiting task itself is skipped (no projection step, nothing read).
void pcgrad_weights(const float* gram, const int64_t* order, int64_t M, int64_t T, float eps, float* weights,
                    int num_threads);

// out[n] = sum_k weights[module(n), k] * grads[k, n] (fp32 accumulation), for every n covered by the
// chunk table. out may be exactly one row of grads (every element is read before it is written).
void segmented_combine(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                       const int64_t* chunk_len, const int64_t* chunk_module, int64_t num_chunks,
                       const float* weights, void* out, int out_dtype, int num_threads);

// The three stages in one call (gram and weights in host scratch).
// cache_bytes == 0: two passes (Gram over all chunks, solve, combine over all chunks: the [T, N] buffer is
// read twice from memory). cache_bytes > 0: cache-blocked schedule: consecutive modules are grouped so that
// a group's (T input rows + output) bytes fit cache_bytes (a larger module is a group alone) and each group
// runs Gram -> solve -> combine while its rows are cached, in one OpenMP parallel region. cache_bytes < 0:
// auto_cache_bytes(). Both schedules give bitwise identical results (same per-chunk partials, same
// fixed-order per-module reduction, same solve and combine), independent of the thread count.
void modular_pcgrad(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                    const int64_t* chunk_len, const int64_t* chunk_module, int64_t num_chunks,
                    const int64_t* chunk_first, int64_t M, const int64_t* order, float eps, void* out,
                    int out_dtype, int num_threads, int64_t cache_bytes = -1);

// Cache sizes in bytes: sysconf(_SC_LEVEL{3,2}_CACHE_SIZE), else /sys/devices/system/cpu/cpu0/cache/index{3,2}/size,
// else the fallbacks below. L2 is per core.
constexpr int64_t kDefaultLLCBytes = int64_t(8) << 20;
constexpr int64_t kDefaultL2Bytes = int64_t(1) << 20;
int64_t llc_bytes();
int64_t l2_bytes();
// The budget of modular_pcgrad's blocked schedule: kCacheFraction * min(LLC, L2 per core x threads).
// Measured on a 2-core Xeon VM (2 MiB L2 per core; a reported 480 MiB L3 that streams only ~1.3x faster than
// DRAM): budgets of 2 - 6 MiB (the threads' L2) gave the best times, 8 - 256 MiB (the L3) no gain.
constexpr double kCacheFraction = 1.0;
int64_t default_cache_bytes(int num_threads = 0);
// The budget used when modular_pcgrad gets cache_bytes < 0: 0 (two passes; the second read already comes
// from the LLC, and blocking only adds barriers) when the whole working set (T input rows + output) fits in
// kLLCFraction of the LLC, else default_cache_bytes(num_threads).
constexpr double kLLCFraction = 0.5;
int64_t auto_cache_bytes(int64_t working_set_bytes, int num_threads = 0);

// Fused optimizer step (the contract of mgs_kernels/_fused_step.py; the descriptor and the hyper columns are in
// ../mgs_fused_step.h, pointers are host pointers). For every element n of every chunk of an active slot
// (active[s] != 0):
//   g = sum_t slot_weights[s * T + t] * grads[t, n]             (fp32)
//   grad_out[n] = g                   (when out_dtype != mgs_fused::kNoOutput; grad_out's storage dtype)
//   SGD / Adam update of the fp32 parameter at param_ptr[s] + (n - slot offset) and its state at
//   state{1,2,3}_ptr[s] (same offset), with the float32 hyper-parameters hyper[s * kNumHyper + column].
// Each element's T gradients, parameter and state are read once and written once; no atomics; results do
// not depend on the thread count. Slots with active[s] == 0 are not touched. Bad tables throw
// std::invalid_argument before anything is written.
void fused_step(const mgs_fused::StepDesc& desc, int num_threads);

// Which instruction-set clone the runtime dispatcher picked ("x86-64-v4", "x86-64-v3", "baseline").
const char* isa();

}  // namespace mgs_cpu
