// Constants of the fused optimizer step shared by csrc/cpu and csrc/cuda (plain C++17, usable by nvcc).
//
// Mirrors mgs_kernels/_fused_step.py: the optimizer kinds and the columns of the per-slot hyper-parameter
// table (float32 [S, kNumHyper]). Both native modules export kHyperColumns as a dict and
// mgs_kernels._native checks it against _fused_step at load time (like the dtype codes).
#pragma once
#include <cstdint>

namespace mgs_fused {

enum Kind : int { kSGD = 0, kAdam = 1 };

// Hyper-parameter columns (see the module docstring of mgs_kernels/_fused_step.py for their meaning).
enum Hyper : int {
  kLR = 0,
  kWD = 1,
  kMomentum = 2,
  kDampeningKeep = 3,  // 1 - dampening
  kNesterov = 4,
  kMaximize = 5,
  kFirst = 6,          // SGD: no momentum buffer yet (buf = g)
  kHasMomentum = 7,
  kOneMinusBeta1 = 8,
  kBeta2 = 9,
  kOneMinusBeta2 = 10,
  kEps = 11,
  kStepSize = 12,      // lr / bias_correction1
  kBC2Sqrt = 13,       // sqrt(bias_correction2)
  kAmsgrad = 14,
  kDecoupled = 15,
  kDecay = 16,         // 1 - lr * weight_decay
  kNumHyper = 17,
};

struct HyperColumn {
  const char* name;  // the constant's name in mgs_kernels/_fused_step.py
  int index;
};

inline constexpr HyperColumn kHyperColumns[] = {
    {"LR", kLR},
    {"WD", kWD},
    {"MOMENTUM", kMomentum},
    {"DAMPENING_KEEP", kDampeningKeep},
    {"NESTEROV", kNesterov},
    {"MAXIMIZE", kMaximize},
    {"FIRST", kFirst},
    {"HAS_MOMENTUM", kHasMomentum},
    {"ONE_MINUS_BETA1", kOneMinusBeta1},
    {"BETA2", kBeta2},
    {"ONE_MINUS_BETA2", kOneMinusBeta2},
    {"EPS", kEps},
    {"STEP_SIZE", kStepSize},
    {"BC2_SQRT", kBC2Sqrt},
    {"AMSGRAD", kAmsgrad},
    {"DECOUPLED", kDecoupled},
    {"DECAY", kDecay},
    {"NUM_HYPER", kNumHyper},
    {"SGD_KIND", kSGD},
    {"ADAM_KIND", kAdam},
};

// grad_out dtype code meaning "no grad_out" (the storage codes are 0..2).
constexpr int kNoOutput = -1;

// Every argument of one fused-step launch, in one descriptor (as apex passes TensorListMetadata): bound once
// in pybind11 (python_api/fused_step_desc.h) as FusedStepDesc and filled by mgs_kernels._native.fused_step_args.
// Pointers are host pointers for the CPU module and device pointers for the CUDA module. The chunk table is
// the slot table of mgs_kernels._fused_step (chunk_slot[k] = slot id; chunks of slot s are
// slot_first[s] .. slot_first[s+1]-1, so the slot's flat offset in grads is chunk_start[slot_first[s]]).
struct StepDesc {
  const void* grads = nullptr;  // [T, N] task rows, element (t, n) at grads + t * row_stride + n
  int dtype = 0;                // storage dtype code of grads
  int64_t T = 0;
  int64_t row_stride = 0;  // elements
  const int64_t* chunk_start = nullptr;  // [K]
  const int64_t* chunk_len = nullptr;    // [K]
  const int64_t* chunk_slot = nullptr;   // [K]
  const int64_t* slot_first = nullptr;   // [S + 1]
  int64_t num_chunks = 0;                // K
  int64_t num_slots = 0;                 // S
  const int32_t* active = nullptr;       // [S] nonzero: update the slot this step
  const float* slot_weights = nullptr;   // [S, T] combine weights (clip folded in)
  const int64_t* param_ptr = nullptr;    // [S] fp32 parameter data pointers (0 where unused)
  const int64_t* state1_ptr = nullptr;   // [S] SGD momentum_buffer | Adam exp_avg
  const int64_t* state2_ptr = nullptr;   // [S] Adam exp_avg_sq
  const int64_t* state3_ptr = nullptr;   // [S] Adam max_exp_avg_sq (amsgrad)
  const float* hyper = nullptr;          // [S, kNumHyper]
  void* grad_out = nullptr;              // [N] combined gradient, or null
  int out_dtype = kNoOutput;             // storage dtype code of grad_out, or kNoOutput
  int kind = kSGD;
};

}  // namespace mgs_fused
