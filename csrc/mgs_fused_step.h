// Constants of the fused optimizer step shared by csrc/cpu and csrc/cuda (plain C++17, usable by nvcc).
//
// Mirrors mgs_kernels/_fused_step.py: the optimizer kinds and the columns of the per-slot hyper-parameter
// table (float32 [S, kNumHyper]). Both native modules export kHyperColumns as a dict and
// mgs_kernels._native checks it against _fused_step at load time (like the dtype codes).
#pragma once

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

}  // namespace mgs_fused
