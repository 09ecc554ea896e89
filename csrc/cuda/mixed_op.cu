// CUDA implementations of the hwnas:: MixedOp operators: same semantics as mixed_op_cpu.cpp.
//
// Element-wise work is grid-stride (one thread per output or input element). Reductions over a
// channel's N*H*W positions (BatchNorm statistics, the per-channel sums of the backward, the depthwise
// weight gradient) run on a 2-D grid, channel x chunk of positions, so even a 16-channel layer fills the
// GPU: each block reduces its chunk (warp shuffles) and adds it into fp64 accumulators with atomicAdd;
// a one-thread-per-channel kernel then turns the sums into statistics and per-channel coefficients.
// float, double, half and bfloat16 inputs; arithmetic in at::opmath_type (fp32 for half/bf16),
// reductions in fp64. The op weights are read on the device: no host synchronisation inside an edge.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../mixed_op.h"

namespace hwnas {
namespace {

constexpr int kThreads = 256;  // every kernel's block size (block_sum relies on it)
constexpr int kWarps = kThreads / 32;
constexpr int kSums = kNumOps + 1;  // per-channel backward sums: slot k for op k, slot kNumOps = sum g

#define HWNAS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

#define GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

// Positions e of one channel handled by this block of a (channel, chunk) grid.
#define CHUNK_STRIDE(e, n) \
  for (int64_t e = blockIdx.y * (int64_t)kThreads + threadIdx.x; e < (n); e += (int64_t)kThreads * gridDim.y)

// Blocks of a 1-D grid-stride launch over n elements (n > 0).
inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

// Chunks per row of a (rows, chunks) reduction grid over `per_row` positions each: about eight blocks
// per SM in all, at least 4 positions per thread, within gridDim.y's limit.
// SMs of the current device, asked once per device. (Not via ATen/cuda/CUDAContext.h, whose cuBLAS and
// cuSPARSE headers a bare nvcc install lacks.)
int64_t sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const int cached = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (cached > 0) return cached;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return std::max(sms, 1);
}

inline unsigned chunks_for(int64_t rows, int64_t per_row) {
  const int64_t sms = sm_count();
  const int64_t want = (8 * sms + rows - 1) / rows;
  const int64_t most = (per_row + 4 * kThreads - 1) / (4 * kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>({want, most, 65535})));
}

inline dim3 reduce_grid(int64_t rows, int64_t per_row) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "hwnas: too many channels for one launch: ", rows);
  return dim3(static_cast<unsigned>(rows), chunks_for(rows, per_row));
}

__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename A>
__device__ __forceinline__ A relu_if(A v, bool relu) {
  return relu && v < A(0) ? A(0) : v;
}

// Sums v over the block (blockDim.x == kThreads); thread 0 then holds the totals.
template <int NV>
__device__ __forceinline__ void block_sum(double (&v)[NV]) {
  __shared__ double part[NV][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < NV; ++q) {
    double s = v[q];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) part[q][warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      double s = lane < kWarps ? part[q][lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      v[q] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Depthwise convolution (weights pre-converted to the math type A)

template <typename T, typename A>
__global__ void dwconv_fwd(const T* x, const A* w, T* out, int64_t total, int64_t c, int64_t h, int64_t wd,
                           int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  GRID_STRIDE(idx, total) {
    const int64_t ow = idx % wo, oh = (idx / wo) % ho, plane = idx / (wo * ho);
    const T* xs = x + plane * h * wd;
    const A* ws = w + (plane % c) * k * k;
    A acc = A(0);
    for (int kh = 0; kh < k; ++kh) {
      const int64_t i = oh * s - p + kh * d;
      if (i < 0 || i >= h) continue;
      for (int kw = 0; kw < k; ++kw) {
        const int64_t j = ow * s - p + kw * d;
        if (j < 0 || j >= wd) continue;
        acc += ws[kh * k + kw] * relu_if(static_cast<A>(xs[i * wd + j]), relu);
      }
    }
    out[idx] = static_cast<T>(acc);
  }
}

template <typename T, typename A>
__global__ void dwconv_bwd_input(const T* g, const T* x, const A* w, T* gx, int64_t total, int64_t c, int64_t h,
                                 int64_t wd, int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  GRID_STRIDE(idx, total) {
    const int64_t j = idx % wd, i = (idx / wd) % h, plane = idx / (wd * h);
    if (relu && static_cast<A>(x[idx]) <= A(0)) {
      gx[idx] = static_cast<T>(A(0));
      continue;
    }
    const T* gs = g + plane * ho * wo;
    const A* ws = w + (plane % c) * k * k;
    A acc = A(0);
    for (int kh = 0; kh < k; ++kh) {
      const int64_t num_h = i + p - kh * d;
      if (num_h < 0 || num_h % s) continue;
      const int64_t oh = num_h / s;
      if (oh >= ho) continue;
      for (int kw = 0; kw < k; ++kw) {
        const int64_t num_w = j + p - kw * d;
        if (num_w < 0 || num_w % s) continue;
        const int64_t ow = num_w / s;
        if (ow >= wo) continue;
        acc += ws[kh * k + kw] * static_cast<A>(gs[oh * wo + ow]);
      }
    }
    gx[idx] = static_cast<T>(acc);
  }
}

// Grid (channel * k * k taps, chunks of the batch's output positions): gw64[tap] += sum g * input.
template <typename T>
__global__ void dwconv_bwd_weight(const T* g, const T* x, double* gw64, int64_t n, int64_t c, int64_t h,
                                  int64_t wd, int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  const int64_t ch = blockIdx.x / (k * k);
  const int tap = blockIdx.x % (k * k), kh = tap / k, kw = tap % k;
  const int64_t per = ho * wo;
  double acc[1] = {0.0};
  CHUNK_STRIDE(e, n * per) {
    const int64_t b = e / per, o = e % per, oh = o / wo, ow = o % wo;
    const int64_t i = oh * s - p + kh * d, j = ow * s - p + kw * d;
    if (i < 0 || i >= h || j < 0 || j >= wd) continue;
    const int64_t plane = b * c + ch;
    acc[0] += double(g[plane * per + o]) * relu_if(double(x[plane * h * wd + i * wd + j]), relu);
  }
  block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(gw64 + blockIdx.x, acc[0]);
}

// ---------------------------------------------------------------------------------------------------
// Combine

// 3x3 max and avg (count_include_pad=False) pool of the window centred at (oh*s, ow*s); `arg` gets
// the first maximum in row-major window order, as ATen picks it.
template <typename T, typename A>
__device__ __forceinline__ void pool_at(const T* xs, int64_t h, int64_t w, int s, int64_t oh, int64_t ow, A& mx,
                                        A& av, int64_t& arg) {
  const int64_t i0 = imax(oh * s - 1, 0), i1 = imin(oh * s + 1, h - 1);
  const int64_t j0 = imax(ow * s - 1, 0), j1 = imin(ow * s + 1, w - 1);
  A m = static_cast<A>(xs[i0 * w + j0]), sum = A(0);
  int64_t best = i0 * w + j0;
  for (int64_t i = i0; i <= i1; ++i)
    for (int64_t j = j0; j <= j1; ++j) {
      const A v = static_cast<A>(xs[i * w + j]);
      if (v > m) {
        m = v;
        best = i * w + j;
      }
      sum += v;
    }
  mx = m;
  av = sum / A((i1 - i0 + 1) * (j1 - j0 + 1));
  arg = best;
}

// Grid (channel, chunk): sums[ch] += (sum max, sum max^2, sum avg, sum avg^2) of the pooled values.
template <typename T>
__global__ void pool_sums(const T* x, double* sums, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho,
                          int64_t wo, int s) {
  using A = at::opmath_type<T>;
  const int64_t ch = blockIdx.x, per = ho * wo;
  double acc[4] = {0, 0, 0, 0};
  CHUNK_STRIDE(e, n * per) {
    const int64_t b = e / per, o = e % per;
    A mx, av;
    int64_t arg;
    pool_at(x + (b * c + ch) * h * w, h, w, s, o / wo, o % wo, mx, av, arg);
    acc[0] += double(mx);
    acc[1] += double(mx) * double(mx);
    acc[2] += double(av);
    acc[3] += double(av) * double(av);
  }
  block_sum(acc);
  if (threadIdx.x == 0)
    for (int q = 0; q < 4; ++q) atomicAdd(sums + ch * 4 + q, acc[q]);
}

// One thread per channel: (training) batch statistics from the sums into stats (4, C), then the
// forward coefficients coef (4, C): out += coef0 * max + coef1 + coef2 * avg + coef3.
template <typename A>
__global__ void forward_coefs(const double* sums, double* stats, const A* weights, A* coef, int64_t c, double m,
                              int64_t active, bool training, double eps) {
  GRID_STRIDE(ch, c) {
    if (training) {
      for (int q = 0; q < 2; ++q) {
        const double mean = sums[ch * 4 + 2 * q] / m;
        stats[(2 * q) * c + ch] = mean;
        stats[(2 * q + 1) * c + ch] = fmax(sums[ch * 4 + 2 * q + 1] / m - mean * mean, 0.0);
      }
    }
    const int ks[2] = {kMaxPool, kAvgPool};
    for (int q = 0; q < 2; ++q) {
      const double wk = op_active(active, ks[q]) ? double(weights[ks[q]]) : 0.0;
      const double inv = 1.0 / sqrt(stats[(2 * q + 1) * c + ch] + eps);
      coef[(2 * q) * c + ch] = A(wk * inv);
      coef[(2 * q + 1) * c + ch] = A(-wk * inv * stats[(2 * q) * c + ch]);
    }
  }
}

struct BranchPtrs {
  const void* p[kNumOps];
};
struct GradPtrs {
  void* p[kNumOps];
};

template <typename T, typename A>
__global__ void combine_fwd(const T* x, const A* weights, BranchPtrs br, const A* coef, T* out, int64_t total,
                            int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo, int s, int64_t active) {
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  const bool ident = s == 1 && op_active(active, kSkip);
  GRID_STRIDE(idx, total) {
    const int64_t ow = idx % wo, oh = (idx / wo) % ho, plane = idx / (wo * ho), ch = plane % c;
    A acc = A(0);
    if (pools) {
      A mx, av;
      int64_t arg;
      pool_at(x + plane * h * w, h, w, s, oh, ow, mx, av, arg);
      acc = coef[ch] * mx + coef[c + ch] + coef[2 * c + ch] * av + coef[3 * c + ch];
    }
    if (ident) acc += weights[kSkip] * static_cast<A>(x[idx]);
    for (int k = kSkip; k < kNumOps; ++k)
      if (br.p[k]) acc += weights[k] * static_cast<A>(static_cast<const T*>(br.p[k])[idx]);
    out[idx] = static_cast<T>(acc);
  }
}

// Grid (channel, chunk): sums (C, 9) += per channel sum g * y_k for every branch k (pools: the pooled
// values, before their BatchNorm), and slot kNumOps += sum g.
template <typename T>
__global__ void combine_bwd_sums(const T* g, const T* x, BranchPtrs br, double* sums, int64_t n, int64_t c,
                                 int64_t h, int64_t w, int64_t ho, int64_t wo, int s, int64_t active) {
  using A = at::opmath_type<T>;
  const int64_t ch = blockIdx.x, per = ho * wo;
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  const bool ident = s == 1 && op_active(active, kSkip);
  double acc[kSums] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  CHUNK_STRIDE(e, n * per) {
    const int64_t b = e / per, o = e % per, plane = b * c + ch, idx = plane * per + o;
    const double gv = double(g[idx]);
    if (pools) {
      A mx, av;
      int64_t arg;
      pool_at(x + plane * h * w, h, w, s, o / wo, o % wo, mx, av, arg);
      acc[kMaxPool] += gv * double(mx);
      acc[kAvgPool] += gv * double(av);
      acc[kNumOps] += gv;
    }
    if (ident) acc[kSkip] += gv * double(x[idx]);
    for (int k = kSkip; k < kNumOps; ++k)
      if (br.p[k]) acc[k] += gv * double(static_cast<const T*>(br.p[k])[idx]);
  }
  block_sum(acc);
  if (threadIdx.x == 0)
    for (int q = 1; q < kSums; ++q) atomicAdd(sums + ch * kSums + q, acc[q]);
}

// One block: per channel the pool backward coefficients coef (6, C) — grad wrt a pooled value =
// a * g + b * pooled + d (BatchNorm backward folded), max then avg — and the weight gradient gw (8,).
template <typename A>
__global__ void backward_coefs(const double* sums, const double* stats, const A* weights, A* coef, double* gw, int64_t c,
                               double m, int64_t active, bool training, double eps) {
  double acc[kNumOps] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
    const double* sc = sums + ch * kSums;
    const double sg = sc[kNumOps];
    for (int k = kSkip; k < kNumOps; ++k) acc[k] += sc[k];
    const int ks[2] = {kMaxPool, kAvgPool};
    for (int q = 0; q < 2; ++q) {
      const double mean = stats[(2 * q) * c + ch], inv = 1.0 / sqrt(stats[(2 * q + 1) * c + ch] + eps);
      const double sgx = inv * (sc[ks[q]] - mean * sg);  // sum g * BN(pooled)
      acc[ks[q]] += sgx;
      const double wk = op_active(active, ks[q]) ? double(weights[ks[q]]) : 0.0;
      double a = wk * inv, b = 0.0, d = 0.0;
      if (training) {
        b = -wk * inv * inv * sgx / m;
        d = -wk * inv * sg / m - b * mean;
      }
      coef[(3 * q) * c + ch] = A(a);
      coef[(3 * q + 1) * c + ch] = A(b);
      coef[(3 * q + 2) * c + ch] = A(d);
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0)
    for (int k = 0; k < kNumOps; ++k) gw[k] = k > 0 && op_active(active, k) ? acc[k] : 0.0;
}

// One thread per input element: identity + the pool gradients of every window containing it.
template <typename T, typename A>
__global__ void combine_bwd_input(const T* g, const T* x, const A* weights, const A* coef, T* gx, int64_t total,
                                  int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo, int s, int64_t active) {
  const bool am = op_active(active, kMaxPool), aa = op_active(active, kAvgPool);
  const bool ident = s == 1 && op_active(active, kSkip);
  GRID_STRIDE(idx, total) {
    const int64_t j = idx % w, i = (idx / w) % h, plane = idx / (w * h), ch = plane % c;
    A acc = ident ? weights[kSkip] * static_cast<A>(g[idx]) : A(0);
    if (am || aa) {
      const T* gs = g + plane * ho * wo;
      const T* xs = x + plane * h * w;
      const A ma = coef[ch], mb = coef[c + ch], md = coef[2 * c + ch];
      const A va = coef[3 * c + ch], vb = coef[4 * c + ch], vd = coef[5 * c + ch];
      // outputs whose 3x3 window (centre oh*s) contains row i: oh*s in [i-1, i+1]
      for (int64_t oh = (i + s - 2 > 0 ? (i + s - 2) / s : 0); oh * s <= i + 1 && oh < ho; ++oh) {
        for (int64_t ow = (j + s - 2 > 0 ? (j + s - 2) / s : 0); ow * s <= j + 1 && ow < wo; ++ow) {
          A mx, av;
          int64_t arg;
          pool_at(xs, h, w, s, oh, ow, mx, av, arg);
          const A gv = static_cast<A>(gs[oh * wo + ow]);
          if (am && arg == i * w + j) acc += ma * gv + mb * mx + md;
          if (aa) {
            const int64_t rows = imin(oh * s + 1, h - 1) - imax(oh * s - 1, 0) + 1;
            const int64_t cols = imin(ow * s + 1, w - 1) - imax(ow * s - 1, 0) + 1;
            acc += (va * gv + vb * av + vd) / A(rows * cols);
          }
        }
      }
    }
    gx[idx] = static_cast<T>(acc);
  }
}

// One thread per output element: grad of every external branch k, w_k * g, from one read of g.
template <typename T, typename A>
__global__ void branch_grads(const T* g, const A* weights, GradPtrs out, int64_t total) {
  GRID_STRIDE(idx, total) {
    const A gv = static_cast<A>(g[idx]);
    for (int k = kSkip; k < kNumOps; ++k)
      if (out.p[k]) static_cast<T*>(out.p[k])[idx] = static_cast<T>(weights[k] * gv);
  }
}

BranchPtrs branch_ptrs(const std::vector<at::Tensor>& slots) {
  BranchPtrs b{};
  for (int k = 0; k < kNumOps; ++k) b.p[k] = slots[k].defined() ? slots[k].const_data_ptr() : nullptr;
  return b;
}

std::vector<at::Tensor> contiguous(std::vector<at::Tensor> slots) {
  for (auto& t : slots)
    if (t.defined()) t = t.contiguous();
  return slots;
}

// The CUDA entry points need x on a CUDA device: the dispatcher also picks them when only another
// argument is a CUDA tensor.
void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "hwnas.", op, ": x is on ", x.device(), " but other arguments are CUDA tensors");
}

at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;  // at::opmath_type of every dispatched type
}

}  // namespace

at::Tensor dwconv_cuda(const at::Tensor& x_, const at::Tensor& weight_, int64_t stride, int64_t dilation,
                       bool relu_input) {
  check_cuda_input(x_, "dwconv");
  check_dwconv(x_, weight_, stride, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weight = weight_.to(math_type(x_.scalar_type())).contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  at::Tensor out = at::empty({n, c, ho, wo}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  HWNAS_DISPATCH(x.scalar_type(), "hwnas_dwconv_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    dwconv_fwd<scalar_t, A><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), total, c, h, w,
        ho, wo, int(weight.size(2)), int(dilation), int(stride), relu_input);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_,
                                                        const at::Tensor& weight_, int64_t stride, int64_t dilation,
                                                        bool relu_input) {
  check_cuda_input(x_, "dwconv_backward");
  check_dwconv(x_, weight_, stride, dilation);
  check_like(grad_out, x_, "dwconv_backward", "grad_out");
  const int64_t n = x_.size(0), c = x_.size(1), h = x_.size(2), w = x_.size(3), k = weight_.size(2);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == n && grad_out.size(1) == c && grad_out.size(2) == ho &&
                  grad_out.size(3) == wo,
              "hwnas.dwconv_backward: grad_out has shape ", grad_out.sizes(), " which does not match x ",
              x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), g = grad_out.contiguous();
  const at::Tensor weight = weight_.to(math_type(x.scalar_type())).contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw64 = at::zeros({c * k * k}, x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  HWNAS_DISPATCH(x.scalar_type(), "hwnas_dwconv_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (x.numel() > 0) {
      dwconv_bwd_input<scalar_t, A><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<A>(),
          gx.mutable_data_ptr<scalar_t>(), x.numel(), c, h, w, ho, wo, int(k), int(dilation), int(stride), relu_input);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (c > 0 && n * ho * wo > 0) {  // no blocks to launch otherwise: the gradient stays zero
      dwconv_bwd_weight<scalar_t><<<reduce_grid(c * k * k, n * ho * wo), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gw64.mutable_data_ptr<double>(), n, c, h, w, ho,
          wo, int(k), int(dilation), int(stride), relu_input);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw64.view(weight_.sizes()).to(weight_.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> combine_cuda(const at::Tensor& x_, const at::Tensor& weights_,
                                                at::TensorList branches_, const std::optional<at::Tensor>& running,
                                                int64_t active, int64_t stride, bool training, double eps) {
  check_cuda_input(x_, "combine");
  const auto slots = contiguous(check_combine(x_, weights_, branches_, active, stride));
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weights = weights_.to(math_type(x_.scalar_type())).contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride), m = n * ho * wo;
  at::Tensor out = at::empty({n, c, ho, wo}, x.options());
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  at::Tensor stats;
  if (training || !pools) {
    stats = at::zeros({4, c}, x.options().dtype(at::kDouble));
  } else {
    TORCH_CHECK(running.has_value() && running->defined(), "hwnas.combine: eval mode needs running_stats");
    check_stats(*running, x_, "combine", "running_stats");
    stats = running->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  HWNAS_DISPATCH(x.scalar_type(), "hwnas_combine_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    at::Tensor coef;
    if (pools && c > 0) {
      at::Tensor sums;
      if (training) {
        sums = at::zeros({c, 4}, x.options().dtype(at::kDouble));
        if (m > 0) {
          pool_sums<scalar_t><<<reduce_grid(c, m), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<double>(), n, c, h, w, ho, wo, int(stride));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      coef = at::empty({4, c}, weights.options());
      forward_coefs<A><<<blocks_for(c), kThreads, 0, stream>>>(
          training ? sums.const_data_ptr<double>() : nullptr, stats.mutable_data_ptr<double>(),
          weights.const_data_ptr<A>(), coef.mutable_data_ptr<A>(), c, double(m), active, training, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (out.numel() > 0) {
      combine_fwd<scalar_t, A><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weights.const_data_ptr<A>(), branch_ptrs(slots),
          coef.defined() ? coef.const_data_ptr<A>() : nullptr, out.mutable_data_ptr<scalar_t>(), out.numel(), c, h, w,
          ho, wo, int(stride), active);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, stats.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> combine_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weights_, at::TensorList branches_,
    const at::Tensor& stats_, int64_t active, int64_t stride, bool training, double eps) {
  check_cuda_input(x_, "combine_backward");
  const auto slots = contiguous(check_combine(x_, weights_, branches_, active, stride));
  check_like(grad_out, x_, "combine_backward", "grad_out");
  check_stats(stats_, x_, "combine_backward", "stats");
  const int64_t n = x_.size(0), c = x_.size(1), h = x_.size(2), w = x_.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride), m = n * ho * wo;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == n && grad_out.size(1) == c && grad_out.size(2) == ho &&
                  grad_out.size(3) == wo,
              "hwnas.combine_backward: grad_out has shape ", grad_out.sizes(), " which does not match x ",
              x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), g = grad_out.contiguous();
  const at::Tensor weights = weights_.to(math_type(x.scalar_type())).contiguous();
  const at::Tensor stats = stats_.to(at::kDouble).contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw64 = at::zeros({kNumOps}, x.options().dtype(at::kDouble));
  std::vector<at::Tensor> grad_branches;
  GradPtrs gp{};
  for (int k = 0; k < kNumOps; ++k)
    if (slots[k].defined()) {
      grad_branches.push_back(at::empty_like(g, at::MemoryFormat::Contiguous));
      gp.p[k] = grad_branches.back().mutable_data_ptr();
    }
  auto stream = c10::cuda::getCurrentCUDAStream();
  HWNAS_DISPATCH(x.scalar_type(), "hwnas_combine_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    at::Tensor coef = at::zeros({6, c}, weights.options());
    if (c > 0) {
      at::Tensor sums = at::zeros({c, kSums}, x.options().dtype(at::kDouble));
      if (m > 0) {
        combine_bwd_sums<scalar_t><<<reduce_grid(c, m), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), branch_ptrs(slots),
            sums.mutable_data_ptr<double>(), n, c, h, w, ho, wo, int(stride), active);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      backward_coefs<A><<<1, kThreads, 0, stream>>>(sums.const_data_ptr<double>(), stats.const_data_ptr<double>(),
                                                   weights.const_data_ptr<A>(), coef.mutable_data_ptr<A>(),
                                                   gw64.mutable_data_ptr<double>(), c, double(m), active, training, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (x.numel() > 0) {
      combine_bwd_input<scalar_t, A><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weights.const_data_ptr<A>(),
          coef.const_data_ptr<A>(), gx.mutable_data_ptr<scalar_t>(), x.numel(), c, h, w, ho, wo, int(stride), active);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!grad_branches.empty() && g.numel() > 0) {
      branch_grads<scalar_t, A><<<blocks_for(g.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), weights.const_data_ptr<A>(), gp, g.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw64.to(weights_.scalar_type()), grad_branches};
}

}  // namespace hwnas

TORCH_LIBRARY_IMPL(hwnas, CUDA, m) {
  m.impl("dwconv", &hwnas::dwconv_cuda);
  m.impl("dwconv_backward", &hwnas::dwconv_backward_cuda);
  m.impl("combine", &hwnas::combine_cuda);
  m.impl("combine_backward", &hwnas::combine_backward_cuda);
}
