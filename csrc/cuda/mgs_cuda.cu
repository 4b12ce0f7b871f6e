// Native CUDA kernels of mgs_kernels (contracts in mgs_cuda.h).
//
// Segmented Gram: one block per chunk (chunks never cross a module). T <= 8: each thread keeps the
//   T(T+1)/2 products of its elements in registers, reading 16-byte vectors of every row (scalar head and
//   tail peel to alignment, scalar everywhere when rows are not 16-byte aligned), then a fixed
//   shuffle-tree + shared-memory reduction writes the chunk's partial. 8 < T <= 64: the block stages
//   [T, 32] tiles in shared memory (fp32) and each thread owns up to 9 task pairs. A cleanup kernel sums
//   each module's partials in chunk order (double) -> no float atomics, bitwise deterministic.
// Solve: one block per module, thread i runs task i's projections with c_i in shared memory, then
//   thread k sums column k over i in order.
// Combine: one block per chunk, 16-byte vector loads of all T rows before the 16-byte store of the same
//   elements, so out may be a row of grads.
// Fused optimizer step: one block per chunk of a slot, combined gradient in registers, SGD / Adam(W) update
//   of the fp32 parameter and state with float4 accesses (see the section below).
// fp32 / bf16 / fp16 storage, fp32 arithmetic; NaN / Inf propagate (padding is never multiplied in).
#include "mgs_cuda.h"

#include "../mgs_fused_step.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

namespace mgs_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSmallT = 8;           // register path up to this many tasks
constexpr int kTileE = 32;           // elements per shared-memory tile of the generic Gram path
constexpr int kMaxPairsPerThread = (kMaxTasks * (kMaxTasks + 1) / 2 + kThreads - 1) / kThreads;  // 9

// ---------------------------------------------------------------------------------------------------
// storage traits
// ---------------------------------------------------------------------------------------------------
template <int DT>
struct Tr;
template <>
struct Tr<kFloat32> {
  using S = float;
  static constexpr int VEC = 4;  // elements per 16-byte vector
  __device__ __forceinline__ static float load(const S* p) { return *p; }
  __device__ __forceinline__ static float ldg(const S* p) { return __ldg(p); }
  __device__ __forceinline__ static void store(S* p, float v) { *p = v; }
};
template <>
struct Tr<kBFloat16> {
  using S = unsigned short;
  static constexpr int VEC = 8;
  __device__ __forceinline__ static float cvt(unsigned short h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }
  __device__ __forceinline__ static unsigned short pack(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ __forceinline__ static float load(const S* p) { return cvt(*p); }
  __device__ __forceinline__ static float ldg(const S* p) { return cvt(__ldg(p)); }
  __device__ __forceinline__ static void store(S* p, float v) { *p = pack(v); }
};
template <>
struct Tr<kFloat16> {
  using S = unsigned short;
  static constexpr int VEC = 8;
  __device__ __forceinline__ static float cvt(unsigned short h) { return __half2float(__ushort_as_half(h)); }
  __device__ __forceinline__ static unsigned short pack(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static float load(const S* p) { return cvt(*p); }
  __device__ __forceinline__ static float ldg(const S* p) { return cvt(__ldg(p)); }
  __device__ __forceinline__ static void store(S* p, float v) { *p = pack(v); }
};

// 16-byte vector -> VEC floats.
template <int DT>
__device__ __forceinline__ void unpack(const uint4 v, float (&x)[Tr<DT>::VEC]) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (DT == kFloat32) {
#pragma unroll
    for (int q = 0; q < 4; ++q) x[q] = __uint_as_float(w[q]);
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      x[2 * q] = Tr<DT>::cvt(static_cast<unsigned short>(w[q] & 0xffffu));
      x[2 * q + 1] = Tr<DT>::cvt(static_cast<unsigned short>(w[q] >> 16));
    }
  }
}

// VEC floats -> out (aligned to VEC * sizeof(out element)).
template <int OT, int VEC>
__device__ __forceinline__ void store_vec(typename Tr<OT>::S* out, const float (&y)[VEC]) {
  if constexpr (OT == kFloat32) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q)
      reinterpret_cast<float4*>(out)[q] = make_float4(y[4 * q], y[4 * q + 1], y[4 * q + 2], y[4 * q + 3]);
  } else {
    unsigned w[VEC / 2];
#pragma unroll
    for (int q = 0; q < VEC / 2; ++q)
      w[q] = static_cast<unsigned>(Tr<OT>::pack(y[2 * q])) | (static_cast<unsigned>(Tr<OT>::pack(y[2 * q + 1])) << 16);
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
    }
  }
}

// Split a chunk into a scalar head (up to the first 16-byte aligned element), aligned 16-byte vectors and a
// scalar tail. The head comes from the ADDRESS of the chunk's first element in row 0: when the row stride is a
// multiple of 16 bytes (rows_ok) every row has the same alignment there, whatever the base pointer or the
// chunk start, so each chunk takes the vector path on its own (a misaligned view such as grads[:, 1:] or an
// odd module start only costs the chunk a short scalar head).
struct Split {
  int64_t head, nvec, tail;  // tail = first element of the scalar tail
};
template <typename S>
__device__ __forceinline__ Split split_chunk(const S* first, int64_t len, bool rows_ok) {
  constexpr int VEC = 16 / sizeof(S);
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(first) & 15u);
  Split s;
  if (!rows_ok || mis % sizeof(S) != 0) {
    s.head = len;
    s.nvec = 0;
    s.tail = len;
    return s;
  }
  const int64_t h = mis == 0 ? 0 : static_cast<int64_t>((16u - mis) / sizeof(S));
  s.head = h < len ? h : len;
  s.nvec = (len - s.head) / VEC;
  s.tail = s.head + s.nvec * VEC;
  return s;
}

__device__ __forceinline__ void pair_of(int p, int T, int& i, int& j) {
  i = 0;
  while (p >= T - i) {
    p -= T - i;
    ++i;
  }
  j = i + p;
}

// ---------------------------------------------------------------------------------------------------
// Gram, T <= 8: registers
// ---------------------------------------------------------------------------------------------------
template <int T, int DT>
__global__ void __launch_bounds__(kThreads)
    gram_small_kernel(const typename Tr<DT>::S* __restrict__ grads, int64_t rs, const int64_t* __restrict__ cstart,
                      const int64_t* __restrict__ clen, float* __restrict__ partials, bool rows_ok) {
  using S = typename Tr<DT>::S;
  constexpr int VEC = Tr<DT>::VEC;
  constexpr int P = T * (T + 1) / 2;
  const int64_t k = blockIdx.x;
  const int64_t start = cstart[k];
  const int64_t len = clen[k];
  const Split sp = split_chunk(grads + start, len, rows_ok);

  float acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0.f;

  auto scalar = [&](int64_t e) {
    float x[T];
#pragma unroll
    for (int t = 0; t < T; ++t) x[t] = Tr<DT>::ldg(grads + t * rs + start + e);
    int p = 0;
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
      for (int j = i; j < T; ++j, ++p) acc[p] = fmaf(x[i], x[j], acc[p]);
  };
  for (int64_t e = threadIdx.x; e < sp.head; e += kThreads) scalar(e);
  for (int64_t e = sp.tail + threadIdx.x; e < len; e += kThreads) scalar(e);

  for (int64_t v = threadIdx.x; v < sp.nvec; v += kThreads) {
    const int64_t e = start + sp.head + v * VEC;
    uint4 raw[T];
#pragma unroll
    for (int t = 0; t < T; ++t) raw[t] = __ldg(reinterpret_cast<const uint4*>(grads + t * rs + e));
    float x[T][VEC];
#pragma unroll
    for (int t = 0; t < T; ++t) unpack<DT>(raw[t], x[t]);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      int p = 0;
#pragma unroll
      for (int i = 0; i < T; ++i)
#pragma unroll
        for (int j = i; j < T; ++j, ++p) acc[p] = fmaf(x[i][q], x[j][q], acc[p]);
    }
  }

  // Fixed-order block reduction: xor-shuffle tree inside each warp, then warps in order.
  __shared__ float red[kWarps][P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float v = acc[p];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[warp][p] = v;
  }
  __syncthreads();
  if (threadIdx.x < P) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
    partials[k * P + threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------------------------------------------
// Gram, 8 < T <= 64: shared-memory tiles, each thread owns up to 9 pairs
// ---------------------------------------------------------------------------------------------------
template <int DT>
__global__ void __launch_bounds__(kThreads)
    gram_generic_kernel(const typename Tr<DT>::S* __restrict__ grads, int64_t rs, int T,
                        const int64_t* __restrict__ cstart, const int64_t* __restrict__ clen,
                        float* __restrict__ partials) {
  __shared__ float tile[kMaxTasks][kTileE + 1];
  const int P = T * (T + 1) / 2;
  const int64_t k = blockIdx.x;
  const int64_t start = cstart[k];
  const int64_t len = clen[k];

  int pi[kMaxPairsPerThread], pj[kMaxPairsPerThread];
  float acc[kMaxPairsPerThread];
#pragma unroll
  for (int r = 0; r < kMaxPairsPerThread; ++r) {
    const int p = threadIdx.x + r * kThreads;
    int i = 0, j = 0;
    if (p < P) pair_of(p, T, i, j);
    pi[r] = i;
    pj[r] = j;
    acc[r] = 0.f;
  }

  for (int64_t base = 0; base < len; base += kTileE) {
    const int64_t n = len - base < kTileE ? len - base : kTileE;
    for (int q = threadIdx.x; q < T * kTileE; q += kThreads) {
      const int t = q / kTileE, e = q % kTileE;
      // padding lanes are zero in every row: their products are 0 and never touch an Inf
      tile[t][e] = e < n ? Tr<DT>::ldg(grads + t * rs + start + base + e) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMaxPairsPerThread; ++r) {
      if (threadIdx.x + r * kThreads < P) {
        const float* a = tile[pi[r]];
        const float* b = tile[pj[r]];
        float s = acc[r];
#pragma unroll 8
        for (int e = 0; e < kTileE; ++e) s = fmaf(a[e], b[e], s);
        acc[r] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kMaxPairsPerThread; ++r) {
    const int p = threadIdx.x + r * kThreads;
    if (p < P) partials[k * P + p] = acc[r];
  }
}

// ---------------------------------------------------------------------------------------------------
// Gram cleanup: module m sums its chunk partials in a fixed order (double), writes the symmetric [T, T]
// ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
    gram_cleanup_kernel(const float* __restrict__ partials, const int64_t* __restrict__ first, int T,
                        float* __restrict__ gram) {
  __shared__ double red[kThreads];
  const int P = T * (T + 1) / 2;
  const int64_t m = blockIdx.x;
  const int64_t k0 = first[m], k1 = first[m + 1];
  for (int p0 = 0; p0 < P; p0 += kThreads) {
    const int pc = P - p0 < kThreads ? P - p0 : kThreads;
    const int slices = kThreads / pc;
    const int s = threadIdx.x / pc;
    const int p = p0 + threadIdx.x % pc;
    if (s < slices) {
      double sum = 0.0;
      for (int64_t k = k0 + s; k < k1; k += slices) sum += static_cast<double>(partials[k * P + p]);
      red[threadIdx.x] = sum;
    }
    __syncthreads();
    if (threadIdx.x < pc) {
      double tot = 0.0;
      for (int q = 0; q < slices; ++q) tot += red[q * pc + threadIdx.x];
      int i, j;
      pair_of(p0 + threadIdx.x, T, i, j);
      const float v = static_cast<float>(tot);
      gram[(m * T + i) * T + j] = v;
      gram[(m * T + j) * T + i] = v;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// PCGrad solve: one block per module, thread i = task i
// ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kMaxTasks)
    pcgrad_kernel(const float* __restrict__ gram, const int64_t* __restrict__ order, int T, float eps,
                  float* __restrict__ weights) {
  __shared__ float G[kMaxTasks * kMaxTasks];
  __shared__ float C[kMaxTasks][kMaxTasks + 1];
  const int64_t m = blockIdx.x;
  for (int q = threadIdx.x; q < T * T; q += blockDim.x) G[q] = gram[m * T * T + q];
  __syncthreads();
  const int i = threadIdx.x;
  if (i < T) {
    for (int c = 0; c < T; ++c) C[i][c] = c == i ? 1.f : 0.f;
    const int64_t* oi = order + (m * T + i) * (T - 1);
    for (int s = 0; s < T - 1; ++s) {
      const int64_t j = oi[s];
      // Malformed entry (outside [0, T) or the task itself): skipped, never read (every backend does this).
      if (j < 0 || j >= T || j == i) continue;
      const float* Gj = G + j * T;   // row j (= column j), as the torch backend reads it
      float d = 0.f;
      for (int c = 0; c < T; ++c) d = fmaf(C[i][c], Gj[c], d);
      const float gjj = Gj[j];
      if (d < 0.f && gjj > eps) C[i][j] -= d / gjj;
    }
  }
  __syncthreads();
  if (threadIdx.x < T) {
    float w = 0.f;
    for (int r = 0; r < T; ++r) w += C[r][threadIdx.x];
    weights[m * T + threadIdx.x] = w;
  }
}

// ---------------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------------
template <int DT, int OT>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const typename Tr<DT>::S* grads, int64_t rs, int T, const int64_t* __restrict__ cstart,
                   const int64_t* __restrict__ clen, const int64_t* __restrict__ cmod,
                   const float* __restrict__ weights, typename Tr<OT>::S* out, bool rows_ok) {
  // grads and out are deliberately not __restrict__: out may be one row of grads.
  using S = typename Tr<DT>::S;
  constexpr int VEC = Tr<DT>::VEC;
  __shared__ float w[kMaxTasks];
  const int64_t k = blockIdx.x;
  const int64_t start = cstart[k];
  const int64_t len = clen[k];
  const int64_t m = cmod[k];
  if (threadIdx.x < T) w[threadIdx.x] = weights[m * T + threadIdx.x];
  __syncthreads();
  Split sp = split_chunk(grads + start, len, rows_ok);
  // The vector store of out needs out aligned at the same element (true in place, and for out and grads
  // both allocated aligned); otherwise this chunk runs scalar.
  constexpr unsigned kOutAlign = VEC * sizeof(typename Tr<OT>::S) < 16 ? VEC * sizeof(typename Tr<OT>::S) : 16;
  if (sp.nvec > 0 && (reinterpret_cast<std::uintptr_t>(out + start + sp.head) & (kOutAlign - 1u)) != 0)
    sp = split_chunk(grads + start, len, false);

  auto scalar = [&](int64_t e) {
    const int64_t n = start + e;
    float acc = 0.f;
    for (int t = 0; t < T; ++t) acc = fmaf(w[t], Tr<DT>::load(grads + t * rs + n), acc);
    Tr<OT>::store(out + n, acc);
  };
  for (int64_t e = threadIdx.x; e < sp.head; e += kThreads) scalar(e);
  for (int64_t e = sp.tail + threadIdx.x; e < len; e += kThreads) scalar(e);

  for (int64_t v = threadIdx.x; v < sp.nvec; v += kThreads) {
    const int64_t n = start + sp.head + v * VEC;
    float acc[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
#pragma unroll 4
    for (int t = 0; t < T; ++t) {
      float x[VEC];
      unpack<DT>(*reinterpret_cast<const uint4*>(grads + t * rs + n), x);
      const float wt = w[t];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = fmaf(wt, x[q], acc[q]);
    }
    store_vec<OT, VEC>(out + n, acc);  // all T rows of these elements were read above
  }
}

// ---------------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------------
std::string cuda_error(const char* what, cudaError_t err) {
  return std::string("mgs_cuda: ") + what + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_error(what, err);
}

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }
// Every row has the same 16-byte alignment at a given column (the per-chunk vector test then looks at row 0).
bool rows_vec_ok(int64_t row_stride, int dtype) { return (row_stride * elem_size(dtype)) % 16 == 0; }

std::string check_common(int64_t T, int64_t num_blocks) {
  if (T < 1 || T > kMaxTasks) return "mgs_cuda: number of tasks must be in [1, 64], got " + std::to_string(T);
  if (num_blocks > INT_MAX) return "mgs_cuda: too many chunks for one launch: " + std::to_string(num_blocks);
  return std::string();
}

template <int DT>
std::string launch_gram_partials(const void* grads_v, int64_t T, int64_t rs, const int64_t* cstart,
                                 const int64_t* clen, int64_t num_chunks, float* partials, cudaStream_t stream) {
  using S = typename Tr<DT>::S;
  const S* grads = static_cast<const S*>(grads_v);
  const bool rows_ok = rows_vec_ok(rs, DT);
  const dim3 grid(static_cast<unsigned>(num_chunks)), block(kThreads);
  switch (T) {
#define MGS_SMALL(TT)                                                                                 \
  case TT:                                                                                            \
    gram_small_kernel<TT, DT><<<grid, block, 0, stream>>>(grads, rs, cstart, clen, partials, rows_ok); \
    break;
    MGS_SMALL(1)
    MGS_SMALL(2)
    MGS_SMALL(3)
    MGS_SMALL(4)
    MGS_SMALL(5)
    MGS_SMALL(6)
    MGS_SMALL(7)
    MGS_SMALL(8)
#undef MGS_SMALL
    default:
      gram_generic_kernel<DT><<<grid, block, 0, stream>>>(grads, rs, static_cast<int>(T), cstart, clen, partials);
  }
  return check_launch("segmented Gram (partials) launch");
}

template <int DT, int OT>
std::string launch_combine(const void* grads_v, int64_t T, int64_t rs, const int64_t* cstart, const int64_t* clen,
                           const int64_t* cmod, int64_t num_chunks, const float* weights, void* out_v,
                           cudaStream_t stream) {
  using S = typename Tr<DT>::S;
  using O = typename Tr<OT>::S;
  const S* grads = static_cast<const S*>(grads_v);
  O* out = static_cast<O*>(out_v);
  combine_kernel<DT, OT><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
      grads, rs, static_cast<int>(T), cstart, clen, cmod, weights, out, rows_vec_ok(rs, DT));
  return check_launch("segmented combine launch");
}

// ---------------------------------------------------------------------------------------------------
// Fused optimizer step: one block per chunk (inside one slot). Each thread handles VEC consecutive
// elements per iteration (VEC = one 16-byte vector of a grads row: 4 fp32 or 8 bf16/fp16): it reads the
// T rows, accumulates the combined gradient in registers (the combine's arithmetic: fmaf chain from 0),
// stores it to grad_out if asked, then loads parameter and state as float4s, updates and stores them.
// Rows that are not 16-byte aligned at the chunk's vector start, or parameter / state / grad_out pointers
// that are not aligned there, make the whole chunk scalar. Flags are block-uniform (no divergence).
// Arithmetic follows torch's CUDA foreach optimizers (_multi_tensor_sgd / _multi_tensor_adam, the default
// on CUDA) op by op; see the comments in step_elem. __launch_bounds__(256, 4): 64 registers, no spills
// (ptxas -v, sm_90), 4 resident blocks per SM for a purely streaming kernel.
// ---------------------------------------------------------------------------------------------------
constexpr int kNoOut = 3;  // OT template value for "no grad_out"

struct FusedParams {
  const void* grads;
  int64_t rs;
  int T;
  int kind;
  const int64_t* cstart;
  const int64_t* clen;
  const int64_t* cslot;
  const int64_t* sfirst;
  const int32_t* active;
  const float* weights;
  const int64_t* pptr;
  const int64_t* s1ptr;
  const int64_t* s2ptr;
  const int64_t* s3ptr;
  const float* hyper;
  void* out;
  bool rows_vec_ok;  // the row stride is a multiple of 16 bytes (see split_chunk)
};

struct Hyp {
  float wd, mom, keep, neg_lr, coeff, beta2, omb2, eps, bc2, neg_step, decay;
  bool neg, has_wd, has_mom, first, nest, small, ams, decoupled;
};

__device__ __forceinline__ Hyp load_hyp(const float* h) {
  using namespace mgs_fused;
  Hyp y;
  y.wd = h[kWD];
  y.mom = h[kMomentum];
  y.keep = h[kDampeningKeep];
  y.neg_lr = -h[kLR];
  const float w1 = h[kOneMinusBeta1];
  y.small = fabsf(w1) < 0.5f;
  y.coeff = y.small ? w1 : w1 - 1.f;
  y.beta2 = h[kBeta2];
  y.omb2 = h[kOneMinusBeta2];
  y.eps = h[kEps];
  y.bc2 = h[kBC2Sqrt];
  y.neg_step = -h[kStepSize];
  y.decay = h[kDecay];
  y.neg = h[kMaximize] != 0.f;
  y.has_wd = h[kWD] != 0.f;
  y.has_mom = h[kHasMomentum] != 0.f;
  y.first = h[kFirst] != 0.f;
  y.nest = h[kNesterov] != 0.f;
  y.ams = h[kAmsgrad] != 0.f;
  y.decoupled = h[kDecoupled] != 0.f;
  return y;
}

// One element. a, b, c: SGD momentum_buffer | Adam exp_avg, exp_avg_sq, max_exp_avg_sq (unused ones ignored).
__device__ __forceinline__ void step_elem(const Hyp& y, int kind, float g, float& p, float& a, float& b, float& c) {
  if (y.neg) g = -g;  // _foreach_neg
  if (kind == mgs_fused::kSGD) {
    if (y.has_wd) g = fmaf(y.wd, p, g);  // _foreach_add(grads, params, alpha=wd): g + wd * p
    if (y.has_mom) {
      // first: buf = clone(grad); else _foreach_mul_(bufs, momentum); _foreach_add_(bufs, grads, alpha=1-damp)
      a = y.first ? g : fmaf(y.keep, g, __fmul_rn(a, y.mom));
      g = y.nest ? fmaf(y.mom, a, g) : a;  // _foreach_add_(grads, bufs, alpha=momentum) | bufs
    }
    p = fmaf(y.neg_lr, g, p);  // _foreach_add_(params, grads, alpha=-lr)
  } else {
    if (y.has_wd) {
      if (y.decoupled) p = __fmul_rn(p, y.decay);  // _foreach_mul_(params, 1 - lr * wd)
      else g = fmaf(y.wd, p, g);                   // _foreach_add(grads, params, alpha=wd)
    }
    // _foreach_lerp_(exp_avgs, grads, 1 - beta1): w < 0.5 ? m + w (g - m) : g - (g - m)(1 - w), one rounding each
    const float d = __fsub_rn(g, a);
    a = fmaf(y.coeff, d, y.small ? a : g);
    // _foreach_mul_(exp_avg_sqs, beta2); _foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    b = fmaf(y.omb2, __fmul_rn(g, g), __fmul_rn(b, y.beta2));
    float vv = b;
    if (y.ams) {
      c = (c != c || c > b) ? c : b;  // _foreach_maximum_ (NaN propagates)
      vv = c;
    }
    // _foreach_sqrt; _foreach_div_(., bias_correction2_sqrt); _foreach_add_(., eps)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), y.bc2), y.eps);
    p = fmaf(y.neg_step, __fdiv_rn(a, denom), p);  // _foreach_addcdiv_(params, exp_avgs, denom, -step_size)
  }
}

template <int VEC>
__device__ __forceinline__ void ld4(const float* p, float (&x)[VEC]) {
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(p)[q];
    x[4 * q] = v.x;
    x[4 * q + 1] = v.y;
    x[4 * q + 2] = v.z;
    x[4 * q + 3] = v.w;
  }
}
template <int VEC>
__device__ __forceinline__ void st4(float* p, const float (&x)[VEC]) {
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q)
    reinterpret_cast<float4*>(p)[q] = make_float4(x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]);
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned a) {
  return (reinterpret_cast<std::uintptr_t>(p) & (a - 1u)) == 0;
}

template <int DT, int OT>
__global__ void __launch_bounds__(kThreads, 4) fused_step_kernel(const FusedParams a) {
  // grads and out are not __restrict__ (kept as in the combine: out could alias a row).
  using S = typename Tr<DT>::S;
  constexpr int VEC = Tr<DT>::VEC;
  __shared__ float w[kMaxTasks];
  __shared__ float hs[mgs_fused::kNumHyper];
  const int64_t k = blockIdx.x;
  const int64_t s = a.cslot[k];
  if (a.active[s] == 0) return;  // block-uniform, before any barrier
  const int T = a.T;
  if (threadIdx.x < T) w[threadIdx.x] = a.weights[s * T + threadIdx.x];
  if (threadIdx.x < mgs_fused::kNumHyper) hs[threadIdx.x] = a.hyper[s * mgs_fused::kNumHyper + threadIdx.x];
  __syncthreads();
  const Hyp y = load_hyp(hs);
  const int kind = a.kind;
  const int64_t start = a.cstart[k], len = a.clen[k];
  const int64_t off = start - a.cstart[a.sfirst[s]];
  const S* grads = static_cast<const S*>(a.grads);
  float* p = reinterpret_cast<float*>(static_cast<std::uintptr_t>(a.pptr[s])) + off;
  // state pointers actually used by this slot (others may be 0)
  const bool use1 = kind == mgs_fused::kSGD ? y.has_mom : true;
  const bool use2 = kind == mgs_fused::kAdam;
  const bool use3 = kind == mgs_fused::kAdam && y.ams;
  float* s1 = use1 ? reinterpret_cast<float*>(static_cast<std::uintptr_t>(a.s1ptr[s])) + off : nullptr;
  float* s2 = use2 ? reinterpret_cast<float*>(static_cast<std::uintptr_t>(a.s2ptr[s])) + off : nullptr;
  float* s3 = use3 ? reinterpret_cast<float*>(static_cast<std::uintptr_t>(a.s3ptr[s])) + off : nullptr;

  // Vector path only if every stream is aligned at the first vector element of the chunk.
  Split sp = split_chunk(grads + start, len, a.rows_vec_ok);
  if (sp.nvec > 0) {
    const int64_t h = sp.head;
    bool ok = aligned_to(p + h, 16) && (!use1 || aligned_to(s1 + h, 16)) && (!use2 || aligned_to(s2 + h, 16)) &&
              (!use3 || aligned_to(s3 + h, 16));
    if constexpr (OT != kNoOut) {
      constexpr unsigned osz = sizeof(typename Tr<OT>::S);
      constexpr unsigned oal = VEC * osz < 16 ? VEC * osz : 16;
      ok = ok && aligned_to(static_cast<typename Tr<OT>::S*>(a.out) + start + h, oal);
    }
    if (!ok) sp = split_chunk(grads + start, len, false);
  }

  auto scalar = [&](int64_t e) {
    const int64_t n = start + e;
    float g = 0.f;
    for (int t = 0; t < T; ++t) g = fmaf(w[t], Tr<DT>::load(grads + t * a.rs + n), g);
    if constexpr (OT != kNoOut) Tr<OT>::store(static_cast<typename Tr<OT>::S*>(a.out) + n, g);
    float pe = p[e];
    float x1 = use1 ? s1[e] : 0.f, x2 = use2 ? s2[e] : 0.f, x3 = use3 ? s3[e] : 0.f;
    step_elem(y, kind, g, pe, x1, x2, x3);
    p[e] = pe;
    if (use1) s1[e] = x1;
    if (use2) s2[e] = x2;
    if (use3) s3[e] = x3;
  };
  for (int64_t e = threadIdx.x; e < sp.head; e += kThreads) scalar(e);
  for (int64_t e = sp.tail + threadIdx.x; e < len; e += kThreads) scalar(e);

  for (int64_t v = threadIdx.x; v < sp.nvec; v += kThreads) {
    const int64_t e = sp.head + v * VEC;
    const int64_t n = start + e;
    float g[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) g[q] = 0.f;
#pragma unroll 4
    for (int t = 0; t < T; ++t) {
      float x[VEC];
      unpack<DT>(*reinterpret_cast<const uint4*>(grads + t * a.rs + n), x);
      const float wt = w[t];
#pragma unroll
      for (int q = 0; q < VEC; ++q) g[q] = fmaf(wt, x[q], g[q]);
    }
    if constexpr (OT != kNoOut) store_vec<OT, VEC>(static_cast<typename Tr<OT>::S*>(a.out) + n, g);
    float pv[VEC], x1[VEC], x2[VEC], x3[VEC];
    ld4<VEC>(p + e, pv);
    if (use1) ld4<VEC>(s1 + e, x1);
    if (use2) ld4<VEC>(s2 + e, x2);
    if (use3) ld4<VEC>(s3 + e, x3);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      if (!use1) x1[q] = 0.f;
      if (!use2) x2[q] = 0.f;
      if (!use3) x3[q] = 0.f;
      step_elem(y, kind, g[q], pv[q], x1[q], x2[q], x3[q]);
    }
    st4<VEC>(p + e, pv);
    if (use1) st4<VEC>(s1 + e, x1);
    if (use2) st4<VEC>(s2 + e, x2);
    if (use3) st4<VEC>(s3 + e, x3);
  }
}

template <int DT, int OT>
std::string launch_fused_step(const FusedParams& a, int64_t num_chunks, cudaStream_t stream) {
  fused_step_kernel<DT, OT><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(a);
  return check_launch("fused optimizer step launch");
}

}  // namespace

int64_t chunk_elems(int64_t T) { return T <= kSmallT ? 8192 : 16384; }

std::string segmented_gram(const void* grads, int dtype, int64_t T, int64_t row_stride, const int64_t* chunk_start,
                           const int64_t* chunk_len, int64_t num_chunks, const int64_t* chunk_first, int64_t M,
                           float* partials, float* gram, void* stream_v) {
  std::string err = check_common(T, num_chunks > M ? num_chunks : M);
  if (!err.empty()) return err;
  if (M == 0) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_v);
  if (num_chunks > 0) {
    switch (dtype) {
      case kFloat32: err = launch_gram_partials<kFloat32>(grads, T, row_stride, chunk_start, chunk_len, num_chunks, partials, stream); break;
      case kBFloat16: err = launch_gram_partials<kBFloat16>(grads, T, row_stride, chunk_start, chunk_len, num_chunks, partials, stream); break;
      case kFloat16: err = launch_gram_partials<kFloat16>(grads, T, row_stride, chunk_start, chunk_len, num_chunks, partials, stream); break;
      default: return "mgs_cuda: unknown storage dtype code " + std::to_string(dtype);
    }
    if (!err.empty()) return err;
  }
  gram_cleanup_kernel<<<static_cast<unsigned>(M), kThreads, 0, stream>>>(partials, chunk_first, static_cast<int>(T), gram);
  return check_launch("segmented Gram (cleanup) launch");
}

std::string pcgrad_weights(const float* gram, const int64_t* order, int64_t M, int64_t T, float eps, float* weights,
                           void* stream_v) {
  std::string err = check_common(T, M);
  if (!err.empty() || M == 0) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_v);
  pcgrad_kernel<<<static_cast<unsigned>(M), kMaxTasks, 0, stream>>>(gram, order, static_cast<int>(T), eps, weights);
  return check_launch("PCGrad solve launch");
}

std::string segmented_combine(const void* grads, int dtype, int64_t T, int64_t row_stride,
                              const int64_t* chunk_start, const int64_t* chunk_len, const int64_t* chunk_module,
                              int64_t num_chunks, const float* weights, void* out, int out_dtype, void* stream_v) {
  std::string err = check_common(T, num_chunks);
  if (!err.empty() || num_chunks == 0) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_v);
#define MGS_COMBINE(DT, OT)                                                                                     \
  if (dtype == DT && out_dtype == OT)                                                                           \
    return launch_combine<DT, OT>(grads, T, row_stride, chunk_start, chunk_len, chunk_module, num_chunks, weights, \
                                  out, stream);
  MGS_COMBINE(kFloat32, kFloat32)
  MGS_COMBINE(kFloat32, kBFloat16)
  MGS_COMBINE(kFloat32, kFloat16)
  MGS_COMBINE(kBFloat16, kFloat32)
  MGS_COMBINE(kBFloat16, kBFloat16)
  MGS_COMBINE(kBFloat16, kFloat16)
  MGS_COMBINE(kFloat16, kFloat32)
  MGS_COMBINE(kFloat16, kBFloat16)
  MGS_COMBINE(kFloat16, kFloat16)
#undef MGS_COMBINE
  return "mgs_cuda: unknown storage dtype codes " + std::to_string(dtype) + " / " + std::to_string(out_dtype);
}

std::string fused_step(const mgs_fused::StepDesc& d, void* stream_v) {
  std::string err = check_common(d.T, d.num_chunks);
  if (!err.empty()) return err;
  const int kind = d.kind, dtype = d.dtype, out_dtype = d.out_dtype;
  if (kind != mgs_fused::kSGD && kind != mgs_fused::kAdam) return "mgs_cuda: unknown optimizer kind " + std::to_string(kind);
  if (dtype < 0 || dtype > 2) return "mgs_cuda: unknown storage dtype code " + std::to_string(dtype);
  if (out_dtype != mgs_fused::kNoOutput && (out_dtype < 0 || out_dtype > 2))
    return "mgs_cuda: unknown grad_out dtype code " + std::to_string(out_dtype);
  if (out_dtype != mgs_fused::kNoOutput && d.grad_out == nullptr) return "mgs_cuda: grad_out is null";
  if (d.num_chunks == 0 || d.num_slots == 0) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_v);
  FusedParams a;
  a.grads = d.grads;
  a.rs = d.row_stride;
  a.T = static_cast<int>(d.T);
  a.kind = kind;
  a.cstart = d.chunk_start;
  a.clen = d.chunk_len;
  a.cslot = d.chunk_slot;
  a.sfirst = d.slot_first;
  a.active = d.active;
  a.weights = d.slot_weights;
  a.pptr = d.param_ptr;
  a.s1ptr = d.state1_ptr;
  a.s2ptr = d.state2_ptr;
  a.s3ptr = d.state3_ptr;
  a.hyper = d.hyper;
  a.out = d.grad_out;
  a.rows_vec_ok = rows_vec_ok(d.row_stride, dtype);
  const int ot = out_dtype == mgs_fused::kNoOutput ? kNoOut : out_dtype;
  const int64_t num_chunks = d.num_chunks;
#define MGS_FUSED(DT, OT) \
  if (dtype == DT && ot == OT) return launch_fused_step<DT, OT>(a, num_chunks, stream);
#define MGS_FUSED_ROW(DT) MGS_FUSED(DT, kFloat32) MGS_FUSED(DT, kBFloat16) MGS_FUSED(DT, kFloat16) MGS_FUSED(DT, kNoOut)
  MGS_FUSED_ROW(kFloat32)
  MGS_FUSED_ROW(kBFloat16)
  MGS_FUSED_ROW(kFloat16)
#undef MGS_FUSED_ROW
#undef MGS_FUSED
  return "mgs_cuda: unknown storage dtype codes " + std::to_string(dtype) + " / " + std::to_string(out_dtype);
}

std::string runtime_info() {
  int rt = 0, drv = 0, count = 0;
  std::string info;
  cudaError_t err = cudaRuntimeGetVersion(&rt);
  info += "runtime=" + (err == cudaSuccess ? std::to_string(rt) : std::string(cudaGetErrorName(err)));
  err = cudaDriverGetVersion(&drv);
  info += " driver=" + (err == cudaSuccess ? std::to_string(drv) : std::string(cudaGetErrorName(err)));
  err = cudaGetDeviceCount(&count);
  info += " devices=" + (err == cudaSuccess ? std::to_string(count) : std::string(cudaGetErrorName(err)));
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
  info += " archs=" + compiled_archs();
  return info;
}

namespace {
// Virtual architectures this file was compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. 800,900), ascending.
constexpr int kArchList[] = {__CUDA_ARCH_LIST__};

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

std::string arch_error(int index) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error("querying the compute capability", err);
  }
  // SASS for sm_XY runs on sm_XZ (Z >= Y); the PTX of the highest architecture is JIT-compiled for newer
  // GPUs. So a device below the lowest compiled architecture has no image to run.
  if (major * 100 + minor * 10 < kArchList[0])
    return "device " + std::to_string(index) + " is sm_" + std::to_string(major) + std::to_string(minor) +
           ", below this module's lowest architecture sm_" + std::to_string(kArchList[0] / 10) +
           " (rebuild with MGS_CUDA_ARCHS including " + std::to_string(major) + std::to_string(minor) + ")";
  return std::string();
}

__global__ void probe_kernel(int* out, int v) { out[threadIdx.x] = v + static_cast<int>(threadIdx.x); }
}  // namespace

std::string compiled_archs() {
  std::string s;
  for (int a : kArchList) s += (s.empty() ? "" : ",") + std::string("sm_") + std::to_string(a / 10);
  return s;
}

std::string runtime_error() {
  int rt = 0, drv = 0, count = 0;
  cudaRuntimeGetVersion(&rt);  // the version linked in (static runtime): never fails
  cudaError_t err = cudaDriverGetVersion(&drv);
  if (err != cudaSuccess) return cuda_error("querying the CUDA driver version", err);
  if (drv == 0)
    return "no CUDA driver is installed (this module links the CUDA " + version_string(rt) + " runtime statically)";
  if (drv / 1000 < rt / 1000)
    return "the CUDA driver supports CUDA " + version_string(drv) + " but this module was built with the CUDA " +
           version_string(rt) + " runtime (needs a driver for CUDA " + std::to_string(rt / 1000) +
           ".x; update the driver or rebuild with an older toolkit)";
  err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error(("cudaGetDeviceCount (driver for CUDA " + version_string(drv) + ")").c_str(), err);
  }
  if (count == 0) return "no CUDA device is visible";
  std::string first_error;
  for (int d = 0; d < count; ++d) {
    const std::string e = arch_error(d);
    if (e.empty()) return std::string();
    if (first_error.empty()) first_error = e;
  }
  return first_error;  // no device can run this module's code
}

std::string device_error(int64_t index) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error("cudaGetDeviceCount", err);
  }
  if (index < 0 || index >= count)
    return "no CUDA device " + std::to_string(index) + " (" + std::to_string(count) + " visible)";
  return arch_error(static_cast<int>(index));
}

std::string probe_device(int64_t index) {
  std::string err = device_error(index);
  if (!err.empty()) return err;
  int prev = 0;
  cudaError_t e = cudaGetDevice(&prev);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  e = cudaSetDevice(static_cast<int>(index));
  if (e != cudaSuccess) return cuda_error("cudaSetDevice", e);
  int* buf = nullptr;
  int host[32] = {0};
  e = cudaMalloc(&buf, sizeof(host));
  if (e == cudaSuccess) {
    probe_kernel<<<1, 32>>>(buf, 1000);
    e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpy(host, buf, sizeof(host), cudaMemcpyDeviceToHost);  // synchronises
    cudaFree(buf);
  }
  if (e == cudaSuccess) {
    for (int i = 0; i < 32; ++i)
      if (host[i] != 1000 + i) err = "the probe kernel on device " + std::to_string(index) + " computed wrong values";
  } else {
    err = cuda_error(("a probe kernel on device " + std::to_string(index)).c_str(), e);
    cudaGetLastError();
  }
  cudaSetDevice(prev);
  return err;
}

}  // namespace mgs_cuda
