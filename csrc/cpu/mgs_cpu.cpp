// Native CPU kernels of mgs_kernels (see mgs_cpu.h for the contracts).
//
// Design
// ------
// * Gram: the chunk table (chunks of a few thousand elements inside one module) is split statically
//   over OpenMP threads. A chunk is walked in sub-blocks of B elements (the T rows of a sub-block fit in
//   L1/L2); bf16/fp16 rows are converted to an fp32 scratch (fp32 rows are read in place). Task pairs are
//   register-blocked in 2x2 tiles (4 rows loaded, 4 products accumulated per element) over L = 16 fp32
//   lanes, so the inner loop is a fixed-length, vectorizable lane loop. At the end of a chunk the lanes
//   are summed in a fixed order into the chunk's partial [T(T+1)/2]; a second pass sums each module's
//   partials in chunk order (in double). Every number depends only on the chunk table, never on which
//   thread ran a chunk: results are bitwise identical across runs AND across thread counts.
// * Solve: one module per iteration (OpenMP over modules), fp32, the loop of DESIGN.md section 1.
// * Combine: one pass, OpenMP (static) over chunks; per sub-block an fp32 accumulator is filled from all
//   T rows before the sub-block of `out` is written, so `out` may be a row of grads.
// * fp16: portable branch-free bit conversions (Giesen's half<->float), which vectorize with plain
//   SSE2 integer ops; bf16 -> fp32 is a shift, fp32 -> bf16/fp16 round to nearest even, NaN stays NaN.
// * ISA: no -march=native. On x86-64 with GCC/Clang the per-chunk kernels are built as target_clones
//   (x86-64-v4 / x86-64-v3 / baseline) and the best one is picked at load time by the ifunc resolver.
//   Different clones may differ in the last bits (FMA contraction); one machine always runs the same clone.
// * modular_pcgrad: two-pass schedule (cache_bytes == 0: Gram over all chunks, solve, combine), or the
//   cache-blocked one: consecutive modules in groups of <= cache_bytes (T rows + output); per group, in one
//   parallel region with one barrier per group, each thread Grams an element-balanced contiguous range of
//   the group's chunks, then (after the barrier) reduces + solves the modules of its range in private
//   scratch and combines the same range backwards (most recently read chunks first). Same per-chunk,
//   per-module and per-element code as the two-pass schedule: bitwise identical results.
// * Fused optimizer step: see the section "Fused optimizer step" (one pass, sub-blocks of 1024 elements).
// * NaN / Inf are never masked: padding lanes are zero in every row (0 * 0), and no task is skipped
//   because its weight is zero.
#include "mgs_cpu.h"

#include "../mgs_fused_step.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MGS_NO_CLONES)
#define MGS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MGS_HAVE_CLONES 1
#else
#define MGS_CLONES
#define MGS_HAVE_CLONES 0
#endif

#if defined(__GNUC__)
#define MGS_INLINE inline __attribute__((always_inline))
#define MGS_RESTRICT __restrict__
#else
#define MGS_INLINE inline
#define MGS_RESTRICT
#endif

namespace mgs_cpu {
namespace {

constexpr int L = 16;               // fp32 lanes of the Gram accumulators
constexpr int64_t kScratchFloats = 16384;  // sub-block scratch: Tp * B floats (64 KiB)

// ---------------------------------------------------------------------------------------------------
// dtype conversions (scalar, branch-free so that loops over them vectorize)
// ---------------------------------------------------------------------------------------------------
MGS_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MGS_INLINE uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

MGS_INLINE float bf16_to_f32(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

MGS_INLINE float f16_to_f32(uint16_t h) {
  uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent + mantissa
  const uint32_t e = o & 0x0f800000u;                     // the fp16 exponent, shifted
  o += 0x38000000u;                                       // rebias: (127 - 15) << 23
  o = (e == 0x0f800000u) ? o + 0x38000000u : o;           // Inf / NaN: exponent all ones
  const float sub = as_float(o + 0x00800000u) - as_float(0x38800000u);  // zero / subnormal
  const float f = (e == 0u) ? sub : as_float(o);
  return as_float(as_bits(f) | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

MGS_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

MGS_INLINE uint16_t f32_to_f16(float f) {
  uint32_t u = as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // Inf / NaN / overflow
  const uint32_t big = (u > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  // subnormal or zero: let the FPU round by adding a magic number
  const float denorm_magic = as_float(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t small = as_bits(as_float(u) + denorm_magic) - as_bits(denorm_magic);
  // normal: rebias and round to nearest even
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  uint32_t o = (u < (113u << 23)) ? small : normal;
  o = (u >= ((127u + 16u) << 23)) ? big : o;
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <int DT>
struct Storage;
template <>
struct Storage<kFloat32> {
  using type = float;
  static MGS_INLINE float load(const float* p, int64_t i) { return p[i]; }
  static MGS_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Storage<kBFloat16> {
  using type = uint16_t;
  static MGS_INLINE float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static MGS_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};
template <>
struct Storage<kFloat16> {
  using type = uint16_t;
  static MGS_INLINE float load(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
  static MGS_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};

MGS_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------
// Gram
// ---------------------------------------------------------------------------------------------------
struct GramShape {
  int64_t T;       // tasks
  int64_t Tp;      // T rounded up to even (the extra row is all zeros)
  int64_t P;       // T (T + 1) / 2 packed upper-triangle entries
  int64_t B;       // sub-block length (multiple of L)
  int64_t ntiles;  // 2x2 tiles over the upper block triangle

  explicit GramShape(int64_t t) : T(t) {
    Tp = round_up(std::max<int64_t>(t, 2), 2);
    P = t * (t + 1) / 2;
    B = std::min<int64_t>(512, std::max<int64_t>(L, (kScratchFloats / Tp) / L * L));
    ntiles = (Tp / 2) * (Tp / 2 + 1) / 2;
  }
};

// Per-thread scratch: converted rows, a zero row, the tile accumulators, the row pointers.
struct GramScratch {
  std::vector<float> rows;   // [Tp, B]: converted sub-block (rows >= T stay zero)
  std::vector<float> zeros;  // [B]
  std::vector<float> acc;    // [ntiles, 4, L]
  std::vector<const float*> ptr;
  explicit GramScratch(const GramShape& s)
      : rows(s.Tp * s.B, 0.f), zeros(s.B, 0.f), acc(s.ntiles * 4 * L, 0.f), ptr(s.Tp, nullptr) {}
};

// acc[4][L] += products of rows (a0, a1) x (b0, b1) over n (a multiple of L) elements.
MGS_INLINE void tile22(const float* MGS_RESTRICT a0, const float* MGS_RESTRICT a1, const float* MGS_RESTRICT b0,
                       const float* MGS_RESTRICT b1, int64_t n, float* MGS_RESTRICT acc) {
  float s00[L], s01[L], s10[L], s11[L];
  for (int l = 0; l < L; ++l) {
    s00[l] = acc[l];
    s01[l] = acc[L + l];
    s10[l] = acc[2 * L + l];
    s11[l] = acc[3 * L + l];
  }
  for (int64_t e = 0; e < n; e += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float x0 = a0[e + l], x1 = a1[e + l], y0 = b0[e + l], y1 = b1[e + l];
      s00[l] += x0 * y0;
      s01[l] += x0 * y1;
      s10[l] += x1 * y0;
      s11[l] += x1 * y1;
    }
  }
  for (int l = 0; l < L; ++l) {
    acc[l] = s00[l];
    acc[L + l] = s01[l];
    acc[2 * L + l] = s10[l];
    acc[3 * L + l] = s11[l];
  }
}

MGS_INLINE float lane_sum(const float* v) {
  // fixed pairwise order
  float h[L / 2];
  for (int l = 0; l < L / 2; ++l) h[l] = v[l] + v[l + L / 2];
  float q[L / 4];
  for (int l = 0; l < L / 4; ++l) q[l] = h[l] + h[l + L / 4];
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// One chunk [start, start + len) -> partial[P] (packed upper triangle, row-major, i <= j).
template <int DT>
MGS_INLINE void gram_chunk_impl(const void* grads_v, int64_t row_stride, int64_t start, int64_t len,
                                const GramShape& s, GramScratch& w, float* MGS_RESTRICT partial) {
  using S = Storage<DT>;
  using In = typename S::type;
  const In* grads = static_cast<const In*>(grads_v);
  const int64_t T = s.T, Tp = s.Tp, B = s.B;
  float* MGS_RESTRICT acc = w.acc.data();
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for (int64_t off = 0; off < len; off += B) {
    const int64_t n = std::min(B, len - off);
    const int64_t nr = round_up(n, L);
    if (DT == kFloat32 && n == nr) {
      for (int64_t t = 0; t < T; ++t)
        w.ptr[t] = reinterpret_cast<const float*>(grads + t * row_stride + start + off);
      for (int64_t t = T; t < Tp; ++t) w.ptr[t] = w.zeros.data();
    } else {
      for (int64_t t = 0; t < T; ++t) {
        const In* MGS_RESTRICT src = grads + t * row_stride + start + off;
        float* MGS_RESTRICT dst = w.rows.data() + t * B;
#pragma omp simd
        for (int64_t e = 0; e < n; ++e) dst[e] = S::load(src, e);
        for (int64_t e = n; e < nr; ++e) dst[e] = 0.f;  // padding: zero in EVERY row
        w.ptr[t] = dst;
      }
      for (int64_t t = T; t < Tp; ++t) w.ptr[t] = w.rows.data() + t * B;  // never written: zeros
    }
    int64_t tile = 0;
    for (int64_t ib = 0; ib < Tp; ib += 2)
      for (int64_t jb = ib; jb < Tp; jb += 2, ++tile)
        tile22(w.ptr[ib], w.ptr[ib + 1], w.ptr[jb], w.ptr[jb + 1], nr, acc + tile * 4 * L);
  }
  int64_t tile = 0;
  for (int64_t ib = 0; ib < Tp; ib += 2)
    for (int64_t jb = ib; jb < Tp; jb += 2, ++tile)
      for (int r = 0; r < 2; ++r)
        for (int c = 0; c < 2; ++c) {
          const int64_t i = ib + r, j = jb + c;
          if (i > j || j >= T) continue;
          const int64_t p = i * T - i * (i - 1) / 2 + (j - i);
          partial[p] = lane_sum(acc + (tile * 4 + r * 2 + c) * L);
        }
}

MGS_CLONES void gram_chunk_f32(const void* g, int64_t rs, int64_t st, int64_t len, const GramShape& s,
                               GramScratch& w, float* partial) {
  gram_chunk_impl<kFloat32>(g, rs, st, len, s, w, partial);
}
MGS_CLONES void gram_chunk_bf16(const void* g, int64_t rs, int64_t st, int64_t len, const GramShape& s,
                                GramScratch& w, float* partial) {
  gram_chunk_impl<kBFloat16>(g, rs, st, len, s, w, partial);
}
MGS_CLONES void gram_chunk_f16(const void* g, int64_t rs, int64_t st, int64_t len, const GramShape& s,
                               GramScratch& w, float* partial) {
  gram_chunk_impl<kFloat16>(g, rs, st, len, s, w, partial);
}

using GramChunkFn = void (*)(const void*, int64_t, int64_t, int64_t, const GramShape&, GramScratch&, float*);

GramChunkFn gram_chunk_fn(int dtype) {
  switch (dtype) {
    case kFloat32: return gram_chunk_f32;
    case kBFloat16: return gram_chunk_bf16;
    case kFloat16: return gram_chunk_f16;
  }
  throw std::invalid_argument("mgs_cpu: unknown storage dtype code " + std::to_string(dtype));
}

// ---------------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kCombineBlock = 1024;

template <int DT, int OT>
MGS_INLINE void combine_chunk_impl(const void* grads_v, int64_t T, int64_t row_stride, int64_t start, int64_t len,
                                   const float* MGS_RESTRICT w, void* out_v) {
  using S = Storage<DT>;
  using O = Storage<OT>;
  const typename S::type* grads = static_cast<const typename S::type*>(grads_v);
  typename O::type* out = static_cast<typename O::type*>(out_v) + start;
  alignas(64) float acc[kCombineBlock];
  for (int64_t off = 0; off < len; off += kCombineBlock) {
    const int64_t n = std::min(kCombineBlock, len - off);
    {
      const typename S::type* MGS_RESTRICT src = grads + start + off;
      const float w0 = w[0];
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) acc[e] = w0 * S::load(src, e);
    }
    for (int64_t t = 1; t < T; ++t) {
      const typename S::type* MGS_RESTRICT src = grads + t * row_stride + start + off;
      const float wt = w[t];
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) acc[e] += wt * S::load(src, e);
    }
    // every row of this sub-block has been read: now it is safe to write (out may alias a row)
    typename O::type* dst = out + off;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) O::store(dst, e, acc[e]);
  }
}

using CombineChunkFn = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, const float*, void*);

#define MGS_COMBINE_FN(NAME, DT, OT)                                                                     \
  MGS_CLONES void NAME(const void* g, int64_t T, int64_t rs, int64_t st, int64_t len, const float* w, void* o) { \
    combine_chunk_impl<DT, OT>(g, T, rs, st, len, w, o);                                               \
  }
MGS_COMBINE_FN(combine_f32_f32, kFloat32, kFloat32)
MGS_COMBINE_FN(combine_f32_bf16, kFloat32, kBFloat16)
MGS_COMBINE_FN(combine_f32_f16, kFloat32, kFloat16)
MGS_COMBINE_FN(combine_bf16_f32, kBFloat16, kFloat32)
MGS_COMBINE_FN(combine_bf16_bf16, kBFloat16, kBFloat16)
MGS_COMBINE_FN(combine_bf16_f16, kBFloat16, kFloat16)
MGS_COMBINE_FN(combine_f16_f32, kFloat16, kFloat32)
MGS_COMBINE_FN(combine_f16_bf16, kFloat16, kBFloat16)
MGS_COMBINE_FN(combine_f16_f16, kFloat16, kFloat16)
#undef MGS_COMBINE_FN

CombineChunkFn combine_chunk_fn(int dtype, int out_dtype) {
  static const CombineChunkFn table[3][3] = {
      {combine_f32_f32, combine_f32_bf16, combine_f32_f16},
      {combine_bf16_f32, combine_bf16_bf16, combine_bf16_f16},
      {combine_f16_f32, combine_f16_bf16, combine_f16_f16},
  };
  if (dtype < 0 || dtype > 2 || out_dtype < 0 || out_dtype > 2)
    throw std::invalid_argument("mgs_cpu: unknown storage dtype code " + std::to_string(dtype) + " / " +
                                std::to_string(out_dtype));
  return table[dtype][out_dtype];
}

// ---------------------------------------------------------------------------------------------------
// Fused optimizer step
// ---------------------------------------------------------------------------------------------------
// A chunk (inside one slot) is walked in sub-blocks of kStepBlock elements: the combined gradient of the
// sub-block is accumulated from all T rows into an fp32 scratch (the combine's exact arithmetic), stored
// to grad_out if asked, then the update loop streams parameter and state once. The optimizer flags are
// uniform per slot, so the update loops are instantiated per flag combination (no per-element branches).
// Arithmetic follows torch's CPU kernels op by op (see the comments); x + a * y is written so that the
// compiler may contract it to an FMA exactly where torch's vectorized kernels use vec::fmadd.
constexpr int64_t kStepBlock = 1024;
using mgs_fused::kNumHyper;

// The launch descriptor is the context of every chunk (fields in ../mgs_fused_step.h).
using FusedCtx = mgs_fused::StepDesc;

template <int DT>
MGS_INLINE void step_accumulate(const void* grads_v, int64_t T, int64_t rs, int64_t n0, int64_t n,
                                const float* MGS_RESTRICT w, float* MGS_RESTRICT acc) {
  using S = Storage<DT>;
  const typename S::type* grads = static_cast<const typename S::type*>(grads_v);
  {
    const typename S::type* MGS_RESTRICT src = grads + n0;
    const float w0 = w[0];
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) acc[e] = w0 * S::load(src, e);
  }
  for (int64_t t = 1; t < T; ++t) {
    const typename S::type* MGS_RESTRICT src = grads + t * rs + n0;
    const float wt = w[t];
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) acc[e] += wt * S::load(src, e);
  }
}

template <int OT>
MGS_INLINE void step_store(void* out_v, int64_t n0, int64_t n, const float* MGS_RESTRICT acc) {
  using O = Storage<OT>;
  typename O::type* MGS_RESTRICT dst = static_cast<typename O::type*>(out_v) + n0;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) O::store(dst, e, acc[e]);
}

// torch.optim.SGD (_single_tensor_sgd):
//   grad = -grad if maximize;  grad = grad.add(param, alpha=wd)                 -> g + wd * p
//   buf = grad.clone() (first) | buf.mul_(momentum).add_(grad, alpha=1-damp)     -> (buf * mom) + keep * g
//   grad = grad.add(buf, alpha=momentum) (nesterov) | buf                         -> g + mom * buf
//   param.add_(grad, alpha=-lr)                                                   -> p + (-lr) * g
template <bool WD, bool MOM, bool FIRST, bool NEST>
MGS_INLINE void sgd_block(float* MGS_RESTRICT p, float* MGS_RESTRICT buf, const float* MGS_RESTRICT acc, int64_t n,
                          bool neg, const float* h) {
  const float wd = h[mgs_fused::kWD], mom = h[mgs_fused::kMomentum], keep = h[mgs_fused::kDampeningKeep];
  const float neg_lr = -h[mgs_fused::kLR];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    float g = neg ? -acc[e] : acc[e];
    const float pe = p[e];
    if (WD) g = g + wd * pe;
    if (MOM) {
      float b;
      if (FIRST) {
        b = g;
      } else {
        const float decayed = buf[e] * mom;
        b = decayed + keep * g;
      }
      buf[e] = b;
      g = NEST ? g + mom * b : b;
    }
    p[e] = pe + neg_lr * g;
  }
}

// torch.optim.Adam / AdamW (_single_tensor_adam, CPU kernels):
//   grad = -grad if maximize
//   param.mul_(1 - lr * wd) (decoupled) | grad = grad.add(param, alpha=wd)       -> p * decay | g + wd * p
//   exp_avg.lerp_(grad, 1 - beta1)            lerp_vec: fmadd(w < .5 ? w : w - 1, g - m, w < .5 ? m : g)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)                -> (v * b2) + ((1-b2) * g) * g
//   torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq) (amsgrad; NaN propagates)
//   denom = (vv.sqrt() / bias_correction2_sqrt).add_(eps)                        -> sqrt(vv) / bc2 + eps
//   param.addcdiv_(exp_avg, denom, value=-step_size)                            -> p + ((-step) * m) / denom
template <int WDM, bool AMS>  // WDM: 0 no weight decay, 1 L2 (added to the gradient), 2 decoupled
MGS_INLINE void adam_block(float* MGS_RESTRICT p, float* MGS_RESTRICT m, float* MGS_RESTRICT v,
                           float* MGS_RESTRICT vmax, const float* MGS_RESTRICT acc, int64_t n, bool neg,
                           const float* h) {
  const float wd = h[mgs_fused::kWD], decay = h[mgs_fused::kDecay];
  const float w1 = h[mgs_fused::kOneMinusBeta1];
  const bool small = std::fabs(w1) < 0.5f;
  const float coeff = small ? w1 : w1 - 1.f;
  const float beta2 = h[mgs_fused::kBeta2], omb2 = h[mgs_fused::kOneMinusBeta2];
  const float eps = h[mgs_fused::kEps], bc2 = h[mgs_fused::kBC2Sqrt];
  const float neg_step = -h[mgs_fused::kStepSize];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    float g = neg ? -acc[e] : acc[e];
    float pe = p[e];
    if (WDM == 1) g = g + wd * pe;
    if (WDM == 2) pe = pe * decay;
    const float me = m[e];
    const float mn = (small ? me : g) + coeff * (g - me);
    const float vd = v[e] * beta2;
    const float vn = vd + (omb2 * g) * g;
    float vv = vn;
    if (AMS) {
      const float a = vmax[e];
      float r = a > vn ? a : vn;
      r = (vn != vn) ? vn : r;
      r = (a != a) ? a : r;
      vmax[e] = r;
      vv = r;
    }
    const float denom = std::sqrt(vv) / bc2 + eps;
    p[e] = pe + (neg_step * mn) / denom;
    m[e] = mn;
    v[e] = vn;
  }
}

MGS_INLINE void update_block(const FusedCtx& c, const float* h, float* p, float* s1, float* s2, float* s3,
                             const float* acc, int64_t n) {
  using namespace mgs_fused;
  const bool neg = h[kMaximize] != 0.f;
  const bool wd = h[kWD] != 0.f;
  if (c.kind == kSGD) {
    const bool mom = h[kHasMomentum] != 0.f, first = h[kFirst] != 0.f, nest = h[kNesterov] != 0.f;
#define MGS_SGD(W, M, F, N) sgd_block<W, M, F, N>(p, s1, acc, n, neg, h)
    if (!mom) {
      if (wd) MGS_SGD(true, false, false, false); else MGS_SGD(false, false, false, false);
    } else if (first) {
      if (wd) {
        if (nest) MGS_SGD(true, true, true, true); else MGS_SGD(true, true, true, false);
      } else {
        if (nest) MGS_SGD(false, true, true, true); else MGS_SGD(false, true, true, false);
      }
    } else {
      if (wd) {
        if (nest) MGS_SGD(true, true, false, true); else MGS_SGD(true, true, false, false);
      } else {
        if (nest) MGS_SGD(false, true, false, true); else MGS_SGD(false, true, false, false);
      }
    }
#undef MGS_SGD
  } else {
    const int wdm = !wd ? 0 : (h[kDecoupled] != 0.f ? 2 : 1);
    const bool ams = h[kAmsgrad] != 0.f;
#define MGS_ADAM(W, A) adam_block<W, A>(p, s1, s2, s3, acc, n, neg, h)
    if (ams) {
      if (wdm == 0) MGS_ADAM(0, true); else if (wdm == 1) MGS_ADAM(1, true); else MGS_ADAM(2, true);
    } else {
      if (wdm == 0) MGS_ADAM(0, false); else if (wdm == 1) MGS_ADAM(1, false); else MGS_ADAM(2, false);
    }
#undef MGS_ADAM
  }
}

template <int DT>
MGS_INLINE void fused_chunk_impl(const FusedCtx& c, int64_t k) {
  const int64_t s = c.chunk_slot[k];
  if (c.active[s] == 0) return;
  const int64_t start = c.chunk_start[k], len = c.chunk_len[k];
  const int64_t off = start - c.chunk_start[c.slot_first[s]];  // offset of the chunk inside its parameter
  const float* h = c.hyper + s * kNumHyper;
  const float* w = c.slot_weights + s * c.T;
  auto at = [&](const int64_t* ptrs) -> float* {
    return ptrs[s] ? reinterpret_cast<float*>(static_cast<std::uintptr_t>(ptrs[s])) + off : nullptr;
  };
  float* p = at(c.param_ptr);
  float* s1 = at(c.state1_ptr);
  float* s2 = at(c.state2_ptr);
  float* s3 = at(c.state3_ptr);
  alignas(64) float acc[kStepBlock];
  for (int64_t b = 0; b < len; b += kStepBlock) {
    const int64_t n = std::min(kStepBlock, len - b);
    const int64_t n0 = start + b;
    step_accumulate<DT>(c.grads, c.T, c.row_stride, n0, n, w, acc);
    switch (c.out_dtype) {
      case kFloat32: step_store<kFloat32>(c.grad_out, n0, n, acc); break;
      case kBFloat16: step_store<kBFloat16>(c.grad_out, n0, n, acc); break;
      case kFloat16: step_store<kFloat16>(c.grad_out, n0, n, acc); break;
      default: break;  // no grad_out
    }
    update_block(c, h, p + b, s1 ? s1 + b : nullptr, s2 ? s2 + b : nullptr, s3 ? s3 + b : nullptr, acc, n);
  }
}

MGS_CLONES void fused_chunk_f32(const FusedCtx& c, int64_t k) { fused_chunk_impl<kFloat32>(c, k); }
MGS_CLONES void fused_chunk_bf16(const FusedCtx& c, int64_t k) { fused_chunk_impl<kBFloat16>(c, k); }
MGS_CLONES void fused_chunk_f16(const FusedCtx& c, int64_t k) { fused_chunk_impl<kFloat16>(c, k); }

using FusedChunkFn = void (*)(const FusedCtx&, int64_t);

FusedChunkFn fused_chunk_fn(int dtype) {
  switch (dtype) {
    case kFloat32: return fused_chunk_f32;
    case kBFloat16: return fused_chunk_bf16;
    case kFloat16: return fused_chunk_f16;
  }
  throw std::invalid_argument("mgs_cpu: unknown storage dtype code " + std::to_string(dtype));
}

int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

void check_tasks(int64_t T) {
  if (T < 1 || T > kMaxTasks)
    throw std::invalid_argument("mgs_cpu: number of tasks must be in [1, 64], got " + std::to_string(T));
}

// Module m's Gram from the partials of its chunks first[m] .. first[m+1]-1, summed in chunk order in double.
// Shared by segmented_gram and both schedules of modular_pcgrad (the same code: the same bits).
void reduce_module(const float* partials, const int64_t* chunk_first, int64_t m, int64_t T, int64_t P, float* G) {
  double sum[kMaxTasks * (kMaxTasks + 1) / 2];
  for (int64_t p = 0; p < P; ++p) sum[p] = 0.0;
  for (int64_t k = chunk_first[m]; k < chunk_first[m + 1]; ++k) {
    const float* part = partials + k * P;
    for (int64_t p = 0; p < P; ++p) sum[p] += static_cast<double>(part[p]);
  }
  int64_t p = 0;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = i; j < T; ++j, ++p) {
      const float v = static_cast<float>(sum[p]);
      G[i * T + j] = v;
      G[j * T + i] = v;
    }
}

void solve_module(const float* G, const int64_t* ord, int64_t T, float eps, float* w) {
  float c[kMaxTasks];
  float total[kMaxTasks];
  for (int64_t k = 0; k < T; ++k) total[k] = 0.f;
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t k = 0; k < T; ++k) c[k] = 0.f;
    c[i] = 1.f;
    const int64_t* oi = ord + i * (T - 1);
    for (int64_t s = 0; s < T - 1; ++s) {
      const int64_t j = oi[s];
      // Malformed entry (outside [0, T) or the task itself): skipped, never read (every backend does this).
      if (j < 0 || j >= T || j == i) continue;
      const float* Gj = G + j * T;    // row j (= column j: G is symmetric), as the torch backend reads it
      float d = 0.f;
      for (int64_t k = 0; k < T; ++k) d += c[k] * Gj[k];
      const float gjj = Gj[j];
      if (d < 0.f && gjj > eps) c[j] -= d / gjj;
    }
    for (int64_t k = 0; k < T; ++k) total[k] += c[k];
  }
  for (int64_t k = 0; k < T; ++k) w[k] = total[k];
}

}  // namespace

void segmented_gram(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                    const int64_t* chunk_len, int64_t num_chunks, const int64_t* chunk_first, int64_t M,
                    float* gram, int num_threads) {
  check_tasks(T);
  const GramChunkFn fn = gram_chunk_fn(dtype);
  const GramShape shape(T);
  const int64_t P = shape.P;
  const int nt = resolve_threads(num_threads);
  std::vector<float> partials(static_cast<size_t>(std::max<int64_t>(num_chunks, 0) * P));
  if (num_chunks > 0) {
#pragma omp parallel num_threads(nt) if (nt > 1 && num_chunks > 1)
    {
      GramScratch scratch(shape);
#pragma omp for schedule(static)
      for (int64_t k = 0; k < num_chunks; ++k)
        fn(grads, row_stride, chunk_start[k], chunk_len[k], shape, scratch, partials.data() + k * P);
    }
  }
  // Fixed-order cleanup: module m sums its chunks first[m] .. first[m+1]-1 in order, in double.
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && M * P > 4096)
  for (int64_t m = 0; m < M; ++m) reduce_module(partials.data(), chunk_first, m, T, P, gram + m * T * T);
}

void pcgrad_weights(const float* gram, const int64_t* order, int64_t M, int64_t T, float eps, float* weights,
                    int num_threads) {
  check_tasks(T);
  const int nt = resolve_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && M * T * T * T > 65536)
  for (int64_t m = 0; m < M; ++m) solve_module(gram + m * T * T, order + m * T * (T - 1), T, eps, weights + m * T);
}

void segmented_combine(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                       const int64_t* chunk_len, const int64_t* chunk_module, int64_t num_chunks,
                       const float* weights, void* out, int out_dtype, int num_threads) {
  check_tasks(T);
  const CombineChunkFn fn = combine_chunk_fn(dtype, out_dtype);
  const int nt = resolve_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && num_chunks > 1)
  for (int64_t k = 0; k < num_chunks; ++k)
    fn(grads, T, row_stride, chunk_start[k], chunk_len[k], weights + chunk_module[k] * T, out);
}

namespace {
// Cache size in bytes: sysconf(name), else /sys/devices/system/cpu/cpu0/cache/index<idx>/size, else fallback.
int64_t cache_size(int sc_name, int idx, int64_t fallback) {
  long v = -1;
#if defined(__unix__) || defined(__APPLE__)
  if (sc_name >= 0) v = sysconf(sc_name);
#else
  (void)sc_name;
#endif
  if (v <= 0) {
    const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size";
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      long n = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%ld%c", &n, &unit);
      std::fclose(f);
      if (got >= 1 && n > 0)
        v = n * (unit == 'K' ? 1024L : unit == 'M' ? 1024L * 1024L : unit == 'G' ? 1024L * 1024L * 1024L : 1L);
    }
  }
  return v > 0 ? static_cast<int64_t>(v) : fallback;
}
#if defined(_SC_LEVEL3_CACHE_SIZE)
constexpr int kScL3 = _SC_LEVEL3_CACHE_SIZE;
#else
constexpr int kScL3 = -1;
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
constexpr int kScL2 = _SC_LEVEL2_CACHE_SIZE;
#else
constexpr int kScL2 = -1;
#endif
}  // namespace

int64_t llc_bytes() {
  static const int64_t bytes = cache_size(kScL3, 3, kDefaultLLCBytes);
  return bytes;
}

int64_t l2_bytes() {
  static const int64_t bytes = cache_size(kScL2, 2, kDefaultL2Bytes);
  return bytes;
}

int64_t default_cache_bytes(int num_threads) {
  const int64_t nt = resolve_threads(num_threads);
  const int64_t cache = std::min(llc_bytes(), l2_bytes() * nt);
  return static_cast<int64_t>(static_cast<double>(cache) * kCacheFraction);
}

int64_t auto_cache_bytes(int64_t working_set_bytes, int num_threads) {
  if (static_cast<double>(working_set_bytes) <= static_cast<double>(llc_bytes()) * kLLCFraction) return 0;
  return default_cache_bytes(num_threads);
}

void modular_pcgrad(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                    const int64_t* chunk_len, const int64_t* chunk_module, int64_t num_chunks,
                    const int64_t* chunk_first, int64_t M, const int64_t* order, float eps, void* out,
                    int out_dtype, int num_threads, int64_t cache_bytes) {
  check_tasks(T);
  const GramChunkFn gram_fn = gram_chunk_fn(dtype);
  const CombineChunkFn combine_fn = combine_chunk_fn(dtype, out_dtype);  // validate codes before any work
  const int64_t esize = dtype == kFloat32 ? 4 : 2, oesize = out_dtype == kFloat32 ? 4 : 2;
  const int64_t per_elem = T * esize + oesize;
  if (cache_bytes < 0) {
    int64_t n = 0;
    for (int64_t k = 0; k < num_chunks; ++k) n += chunk_len[k];
    cache_bytes = auto_cache_bytes(n * per_elem, num_threads);
  }
  if (cache_bytes == 0 || num_chunks <= 0) {  // two-pass schedule: Gram over all chunks, solve, combine
    std::vector<float> gram(static_cast<size_t>(M * T * T));
    std::vector<float> weights(static_cast<size_t>(M * T));
    segmented_gram(grads, dtype, T, row_stride, chunk_start, chunk_len, num_chunks, chunk_first, M, gram.data(),
                   num_threads);
    pcgrad_weights(gram.data(), order, M, T, eps, weights.data(), num_threads);
    segmented_combine(grads, dtype, T, row_stride, chunk_start, chunk_len, chunk_module, num_chunks,
                      weights.data(), out, out_dtype, num_threads);
    return;
  }
  // Cache-blocked schedule: consecutive modules in groups whose bytes (T input rows + the output) fit
  // cache_bytes; a larger module forms a group alone. Per group: Gram partials of its chunks, then reduce +
  // solve of its modules, then combine of its chunks while the rows are still cached. The per-chunk,
  // per-module and per-element arithmetic is that of the two-pass schedule (same functions): same bits.
  std::vector<int64_t> group_first{0};  // module boundaries of the groups
  {
    int64_t bytes = 0;
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = 0;
      for (int64_t k = chunk_first[m]; k < chunk_first[m + 1]; ++k) n += chunk_len[k];
      const int64_t b = n * per_elem;
      if (m > group_first.back() && bytes + b > cache_bytes) {
        group_first.push_back(m);
        bytes = 0;
      }
      bytes += b;
    }
    group_first.push_back(M);
  }
  const int64_t num_groups = static_cast<int64_t>(group_first.size()) - 1;
  const GramShape shape(T);
  const int64_t P = shape.P;
  const int nt = resolve_threads(num_threads);
  std::vector<float> partials(static_cast<size_t>(num_chunks * P));
  // One parallel region, one barrier per group. Thread `tid` owns a contiguous, element-balanced range of
  // the group's chunks for BOTH its Gram and its combine (so the combine re-reads what this core just read).
  // After the barrier every thread reduces + solves the modules its combine range touches, itself, into
  // private scratch (a module shared by two ranges is solved twice, with the same code and the same bits).
  // The combine of group g and the Gram of group g + 1 touch disjoint chunks (out may be a row of grads:
  // out[n] is only written for n in group g) and disjoint partials, so no second barrier is needed.
#pragma omp parallel num_threads(nt) if (nt > 1 && num_chunks > 1)
  {
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    GramScratch scratch(shape);
    std::vector<float> Gm(static_cast<size_t>(T * T));
    std::vector<float> Wl;  // weights of the modules of this thread's combine range
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t m0 = group_first[g], m1 = group_first[g + 1];
      const int64_t k0 = chunk_first[m0], k1 = chunk_first[m1];
      int64_t c0 = k0, c1 = k0;
      if (k1 > k0) {
        // chunks are sorted and adjacent: the group's elements are [base, end); split them evenly by chunk start
        const int64_t base = chunk_start[k0], total = chunk_start[k1 - 1] + chunk_len[k1 - 1] - base;
        auto bound = [&](int64_t t) -> int64_t {
          if (t <= 0) return k0;
          if (t >= nth) return k1;
          const int64_t target = base + total * t / nth;
          return std::lower_bound(chunk_start + k0, chunk_start + k1, target) - chunk_start;
        };
        c0 = bound(tid);
        c1 = bound(tid + 1);
      }
      for (int64_t k = c0; k < c1; ++k)
        gram_fn(grads, row_stride, chunk_start[k], chunk_len[k], shape, scratch, partials.data() + k * P);
#pragma omp barrier
      if (c1 > c0) {
        const int64_t ma = chunk_module[c0], mb = chunk_module[c1 - 1];
        Wl.resize(static_cast<size_t>((mb - ma + 1) * T));
        for (int64_t m = ma; m <= mb; ++m) {
          reduce_module(partials.data(), chunk_first, m, T, P, Gm.data());
          solve_module(Gm.data(), order + m * T * (T - 1), T, eps, Wl.data() + (m - ma) * T);
        }
        // Backwards: the chunks this core read last (still in its L2 when the range is larger) come first.
        for (int64_t k = c1 - 1; k >= c0; --k)
          combine_fn(grads, T, row_stride, chunk_start[k], chunk_len[k], Wl.data() + (chunk_module[k] - ma) * T, out);
      }
    }
  }
}

void fused_step(const mgs_fused::StepDesc& d, int num_threads) {
  using namespace mgs_fused;
  check_tasks(d.T);
  const FusedChunkFn fn = fused_chunk_fn(d.dtype);
  if (d.kind != kSGD && d.kind != kAdam)
    throw std::invalid_argument("mgs_cpu: unknown optimizer kind " + std::to_string(d.kind));
  if (d.out_dtype != kNoOutput && (d.out_dtype < 0 || d.out_dtype > 2))
    throw std::invalid_argument("mgs_cpu: unknown grad_out dtype code " + std::to_string(d.out_dtype));
  if (d.out_dtype != kNoOutput && d.grad_out == nullptr) throw std::invalid_argument("mgs_cpu: grad_out is null");
  const int64_t num_chunks = d.num_chunks, S = d.num_slots;
  if (num_chunks <= 0) return;
  // Validate the slot tables once (cheap: S and K are a few hundred / thousand) before any write.
  for (int64_t k = 0; k < num_chunks; ++k)
    if (d.chunk_slot[k] < 0 || d.chunk_slot[k] >= S)
      throw std::invalid_argument("mgs_cpu: chunk " + std::to_string(k) + " has slot id out of range");
  for (int64_t s = 0; s < S; ++s) {
    if (d.active[s] == 0 || d.slot_first[s] == d.slot_first[s + 1]) continue;
    const float* h = d.hyper + s * kNumHyper;
    bool ok = d.param_ptr[s] != 0;
    if (d.kind == kSGD && h[kHasMomentum] != 0.f) ok = ok && d.state1_ptr[s] != 0;
    if (d.kind == kAdam)
      ok = ok && d.state1_ptr[s] != 0 && d.state2_ptr[s] != 0 && (h[kAmsgrad] == 0.f || d.state3_ptr[s] != 0);
    if (!ok) throw std::invalid_argument("mgs_cpu: active slot " + std::to_string(s) + " lacks a parameter or state pointer");
  }
  const int nt = resolve_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && num_chunks > 1)
  for (int64_t k = 0; k < num_chunks; ++k) fn(d, k);
}

const char* isa() {
#if MGS_HAVE_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64 (baseline)";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "baseline";
#endif
}

}  // namespace mgs_cpu
