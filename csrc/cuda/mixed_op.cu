// CUDA implementations of the hwnas:: MixedOp operators: same semantics as mixed_op_cpu.cpp.
// Straightforward grid-stride kernels (one thread per output or input element) plus one block per
// channel for the BatchNorm statistics and per-channel sums. Weights are read on the device, so no
// host synchronisation happens inside an edge.
//
// NOTE: written without access to a GPU; compiled only when torch has CUDA and nvcc is found.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../mixed_op.h"

namespace hwnas {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

#define GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T relu_if(T v, bool relu) {
  return relu && v < T(0) ? T(0) : v;
}

// ---------------------------------------------------------------------------------------------------
// Depthwise convolution

template <typename T>
__global__ void dwconv_fwd(const T* x, const T* w, T* out, int64_t total, int64_t c, int64_t h, int64_t wd,
                           int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  GRID_STRIDE(idx, total) {
    const int64_t ow = idx % wo, oh = (idx / wo) % ho, plane = idx / (wo * ho);
    const T* xs = x + plane * h * wd;
    const T* ws = w + (plane % c) * k * k;
    T acc = T(0);
    for (int kh = 0; kh < k; ++kh) {
      const int64_t i = oh * s - p + kh * d;
      if (i < 0 || i >= h) continue;
      for (int kw = 0; kw < k; ++kw) {
        const int64_t j = ow * s - p + kw * d;
        if (j < 0 || j >= wd) continue;
        acc += ws[kh * k + kw] * relu_if(xs[i * wd + j], relu);
      }
    }
    out[idx] = acc;
  }
}

template <typename T>
__global__ void dwconv_bwd_input(const T* g, const T* x, const T* w, T* gx, int64_t total, int64_t c, int64_t h,
                                 int64_t wd, int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  GRID_STRIDE(idx, total) {
    const int64_t j = idx % wd, i = (idx / wd) % h, plane = idx / (wd * h);
    if (relu && x[idx] <= T(0)) {
      gx[idx] = T(0);
      continue;
    }
    const T* gs = g + plane * ho * wo;
    const T* ws = w + (plane % c) * k * k;
    T acc = T(0);
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
        acc += ws[kh * k + kw] * gs[oh * wo + ow];
      }
    }
    gx[idx] = acc;
  }
}

// One block per (channel, tap): reduce grad_out * input over batch and output positions.
template <typename T>
__global__ void dwconv_bwd_weight(const T* g, const T* x, T* gw, int64_t n, int64_t c, int64_t h, int64_t wd,
                                  int64_t ho, int64_t wo, int k, int d, int s, bool relu) {
  const int p = d * (k - 1) / 2;
  const int64_t ch = blockIdx.x / (k * k);
  const int tap = blockIdx.x % (k * k), kh = tap / k, kw = tap % k;
  const int64_t per = ho * wo, total = n * per;
  double acc = 0;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t b = e / per, o = e % per, oh = o / wo, ow = o % wo;
    const int64_t i = oh * s - p + kh * d, j = ow * s - p + kw * d;
    if (i < 0 || i >= h || j < 0 || j >= wd) continue;
    const int64_t plane = b * c + ch;
    acc += double(g[plane * per + o]) * double(relu_if(x[plane * h * wd + i * wd + j], relu));
  }
  __shared__ double red[kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) red[threadIdx.x] += red[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[ch * k * k + tap] = T(red[0]);
}

// ---------------------------------------------------------------------------------------------------
// Combine

template <typename T>
__device__ __forceinline__ void pool_at(const T* xs, int64_t h, int64_t w, int s, int64_t oh, int64_t ow, T& mx,
                                        T& av) {
  const int64_t i0 = imax(oh * s - 1, 0), i1 = imin(oh * s + 1, h - 1);
  const int64_t j0 = imax(ow * s - 1, 0), j1 = imin(ow * s + 1, w - 1);
  T m = xs[i0 * w + j0], sum = T(0);
  for (int64_t i = i0; i <= i1; ++i)
    for (int64_t j = j0; j <= j1; ++j) {
      const T v = xs[i * w + j];
      m = v > m ? v : m;
      sum += v;
    }
  mx = m;
  av = sum / T((i1 - i0 + 1) * (j1 - j0 + 1));
}

// One block per channel: batch mean and biased variance of both pools -> stats (4, C) (double).
template <typename T>
__global__ void pool_stats(const T* x, double* stats, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho,
                           int64_t wo, int s) {
  const int64_t ch = blockIdx.x, per = ho * wo, total = n * per;
  double acc[4] = {0, 0, 0, 0};
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t b = e / per, o = e % per;
    T mx, av;
    pool_at(x + (b * c + ch) * h * w, h, w, s, o / wo, o % wo, mx, av);
    acc[0] += mx;
    acc[1] += double(mx) * mx;
    acc[2] += av;
    acc[3] += double(av) * av;
  }
  __shared__ double red[4][kThreads];
  for (int q = 0; q < 4; ++q) red[q][threadIdx.x] = acc[q];
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off)
      for (int q = 0; q < 4; ++q) red[q][threadIdx.x] += red[q][threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double mm = red[0][0] / total, ma = red[2][0] / total;
    stats[0 * c + ch] = mm;
    stats[1 * c + ch] = fmax(red[1][0] / total - mm * mm, 0.0);
    stats[2 * c + ch] = ma;
    stats[3 * c + ch] = fmax(red[3][0] / total - ma * ma, 0.0);
  }
}

struct BranchPtrs {
  const void* p[kNumOps];
};

template <typename T>
__global__ void combine_fwd(const T* x, const T* weights, BranchPtrs br, const double* stats, T* out, int64_t total,
                            int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo, int s, int64_t active,
                            double eps) {
  const bool am = (active >> kMaxPool) & 1, aa = (active >> kAvgPool) & 1;
  const bool ident = s == 1 && ((active >> kSkip) & 1);
  GRID_STRIDE(idx, total) {
    const int64_t ow = idx % wo, oh = (idx / wo) % ho, plane = idx / (wo * ho), ch = plane % c;
    T acc = T(0);
    if (am || aa) {
      T mx, av;
      pool_at(x + plane * h * w, h, w, s, oh, ow, mx, av);
      if (am) acc += weights[kMaxPool] * T((mx - stats[0 * c + ch]) / sqrt(stats[1 * c + ch] + eps));
      if (aa) acc += weights[kAvgPool] * T((av - stats[2 * c + ch]) / sqrt(stats[3 * c + ch] + eps));
    }
    if (ident) acc += weights[kSkip] * x[idx];
    for (int k = kSkip; k < kNumOps; ++k)
      if (br.p[k]) acc += weights[k] * static_cast<const T*>(br.p[k])[idx];
    out[idx] = acc;
  }
}

// One block per channel: sums of grad_out against every branch -> part (C, 8 + 1): slot k = sum g*y_k
// (pools: sum g*pooled), slot 8 = sum g.
template <typename T>
__global__ void combine_bwd_sums(const T* g, const T* x, BranchPtrs br, double* part, int64_t n, int64_t c,
                                 int64_t h, int64_t w, int64_t ho, int64_t wo, int s, int64_t active) {
  const int64_t ch = blockIdx.x, per = ho * wo, total = n * per;
  const bool pools = ((active >> kMaxPool) & 1) || ((active >> kAvgPool) & 1);
  const bool ident = s == 1 && ((active >> kSkip) & 1);
  double acc[kNumOps + 1] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t b = e / per, o = e % per, plane = b * c + ch, idx = plane * per + o;
    const double gv = g[idx];
    if (pools) {
      T mx, av;
      pool_at(x + plane * h * w, h, w, s, o / wo, o % wo, mx, av);
      acc[kMaxPool] += gv * mx;
      acc[kAvgPool] += gv * av;
      acc[kNumOps] += gv;
    }
    if (ident) acc[kSkip] += gv * x[idx];
    for (int k = kSkip; k < kNumOps; ++k)
      if (br.p[k]) acc[k] += gv * static_cast<const T*>(br.p[k])[idx];
  }
  __shared__ double red[kThreads];
  for (int q = 1; q <= kNumOps; ++q) {
    red[threadIdx.x] = acc[q];
    __syncthreads();
    for (int off = blockDim.x / 2; off > 0; off >>= 1) {
      if (threadIdx.x < off) red[threadIdx.x] += red[threadIdx.x + off];
      __syncthreads();
    }
    if (threadIdx.x == 0) part[ch * (kNumOps + 1) + q] = red[0];
    __syncthreads();
  }
}

// grad wrt a pooled value = A * g + B * pooled + D (BatchNorm backward folded), per channel and pool.
struct PoolCoef {
  double a, b, d;
};

__device__ __forceinline__ PoolCoef pool_coef(double wk, double mean, double var, double sg, double sgp, double m,
                                              double eps, bool training) {
  const double inv = 1.0 / sqrt(var + eps);
  PoolCoef r{wk * inv, 0.0, 0.0};
  if (training) {
    const double sgx = inv * (sgp - mean * sg);
    r.b = -wk * inv * inv * sgx / m;
    r.d = -wk * inv * sg / m - r.b * mean;
  }
  return r;
}

// One thread per input element: identity + gather of the pool gradients of every window containing it.
template <typename T>
__global__ void combine_bwd_input(const T* g, const T* x, const T* weights, const double* stats, const double* part,
                                  T* gx, int64_t total, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho,
                                  int64_t wo, int s, int64_t active, bool training, double eps) {
  const bool am = (active >> kMaxPool) & 1, aa = (active >> kAvgPool) & 1;
  const bool ident = s == 1 && ((active >> kSkip) & 1);
  const double m = double(n * ho * wo);
  GRID_STRIDE(idx, total) {
    const int64_t j = idx % w, i = (idx / w) % h, plane = idx / (w * h), ch = plane % c;
    const T* gs = g + plane * ho * wo;
    const T* xs = x + plane * h * w;
    double acc = ident ? double(weights[kSkip]) * g[idx] : 0.0;
    if (am || aa) {
      const double* pc = part + ch * (kNumOps + 1);
      const PoolCoef cm = pool_coef(double(weights[kMaxPool]), stats[0 * c + ch], stats[1 * c + ch], pc[kNumOps],
                                    pc[kMaxPool], m, eps, training);
      const PoolCoef ca = pool_coef(double(weights[kAvgPool]), stats[2 * c + ch], stats[3 * c + ch], pc[kNumOps],
                                    pc[kAvgPool], m, eps, training);
      // outputs whose 3x3 window (centre oh*s) contains row i: oh*s in [i-1, i+1]
      for (int64_t oh = (i - 1 + s - 1 > 0 ? (i - 1 + s - 1) / s : 0); oh * s <= i + 1 && oh < ho; ++oh) {
        for (int64_t ow = (j - 1 + s - 1 > 0 ? (j - 1 + s - 1) / s : 0); ow * s <= j + 1 && ow < wo; ++ow) {
          T mx, av;
          pool_at(xs, h, w, s, oh, ow, mx, av);
          const double gv = gs[oh * wo + ow];
          if (am) {
            // first maximum in row-major window order, as ATen picks it
            const int64_t i0 = imax(oh * s - 1, 0), i1 = imin(oh * s + 1, h - 1);
            const int64_t j0 = imax(ow * s - 1, 0), j1 = imin(ow * s + 1, w - 1);
            int64_t best = i0 * w + j0;
            for (int64_t a = i0; a <= i1; ++a)
              for (int64_t b = j0; b <= j1; ++b)
                if (xs[a * w + b] > xs[best]) best = a * w + b;
            if (best == i * w + j) acc += cm.a * gv + cm.b * mx + cm.d;
          }
          if (aa) {
            const int64_t i0 = imax(oh * s - 1, 0), i1 = imin(oh * s + 1, h - 1);
            const int64_t j0 = imax(ow * s - 1, 0), j1 = imin(ow * s + 1, w - 1);
            acc += (ca.a * gv + ca.b * av + ca.d) / double((i1 - i0 + 1) * (j1 - j0 + 1));
          }
        }
      }
    }
    gx[idx] = T(acc);
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

}  // namespace

at::Tensor dwconv_cuda(const at::Tensor& x_, const at::Tensor& weight_, int64_t stride, int64_t dilation,
                       bool relu_input) {
  check_dwconv(x_, weight_, stride, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  at::Tensor out = at::empty({n, c, ho, wo}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_cuda", [&] {
    dwconv_fwd<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, c,
        h, w, ho, wo, int(weight.size(2)), int(dilation), int(stride), relu_input);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_,
                                                        const at::Tensor& weight_, int64_t stride, int64_t dilation,
                                                        bool relu_input) {
  check_dwconv(x_, weight_, stride, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), g = grad_out.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = weight.size(2);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == n && g.size(1) == c && g.size(2) == ho && g.size(3) == wo,
              "hwnas.dwconv_backward: grad_out has shape ", g.sizes(), " which does not match x ", x.sizes());
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_backward_cuda", [&] {
    if (x.numel() > 0)
      dwconv_bwd_input<scalar_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), x.numel(), c, h, w, ho, wo, int(k), int(dilation), int(stride), relu_input);
    dwconv_bwd_weight<scalar_t><<<c * k * k, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(), n, c, h, w, ho,
        wo, int(k), int(dilation), int(stride), relu_input);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> combine_cuda(const at::Tensor& x_, const at::Tensor& weights_,
                                                at::TensorList branches_, const std::optional<at::Tensor>& running,
                                                int64_t active, int64_t stride, bool training, double eps,
                                                bool /*cache: the CUDA backward recomputes the pools*/) {
  const auto slots = contiguous(check_combine(x_, weights_, branches_, active, stride));
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weights = weights_.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  at::Tensor out = at::empty({n, c, ho, wo}, x.options());
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  at::Tensor stats;
  if (training || !pools) {
    stats = at::zeros({4, c}, x.options().dtype(at::kDouble));
  } else {
    TORCH_CHECK(running.has_value() && running->defined() && running->dim() == 2 && running->size(0) == 4 &&
                    running->size(1) == c,
                "hwnas.combine: eval mode needs running_stats of shape (4, ", c, ")");
    stats = running->to(at::kDouble).contiguous().clone();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_combine_cuda", [&] {
    if (training && pools && n * ho * wo > 0)
      pool_stats<scalar_t><<<c, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), stats.mutable_data_ptr<double>(),
                                                       n, c, h, w, ho, wo, int(stride));
    if (out.numel() > 0)
      combine_fwd<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), branch_ptrs(slots),
          stats.const_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), out.numel(), c, h, w, ho, wo, int(stride),
          active, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, stats.to(x.scalar_type()), at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> combine_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weights_, at::TensorList branches_,
    const at::Tensor& stats_, const at::Tensor& /*pool_cache: unused, empty*/, int64_t active, int64_t stride,
    bool training, double eps) {
  const auto slots = contiguous(check_combine(x_, weights_, branches_, active, stride));
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weights = weights_.contiguous(), g = grad_out.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == n && g.size(1) == c && g.size(2) == ho && g.size(3) == wo,
              "hwnas.combine_backward: grad_out has shape ", g.sizes(), " which does not match x ", x.sizes());
  TORCH_CHECK(stats_.dim() == 2 && stats_.size(0) == 4 && stats_.size(1) == c,
              "hwnas.combine_backward: stats must be (4, ", c, ")");
  const at::Tensor stats = stats_.to(at::kDouble).contiguous();
  at::Tensor part = at::zeros({c, kNumOps + 1}, x.options().dtype(at::kDouble));
  at::Tensor gx = at::empty_like(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_combine_backward_cuda", [&] {
    if (g.numel() > 0)
      combine_bwd_sums<scalar_t><<<c, kThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                             branch_ptrs(slots), part.mutable_data_ptr<double>(), n, c,
                                                             h, w, ho, wo, int(stride), active);
    if (x.numel() > 0)
      combine_bwd_input<scalar_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
          stats.const_data_ptr<double>(), part.const_data_ptr<double>(), gx.mutable_data_ptr<scalar_t>(), x.numel(), n,
          c, h, w, ho, wo, int(stride), active, training, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // grad of the weights: pools get sum g * BN(pooled) = invstd * (sum g*pooled - mean * sum g)
  at::Tensor sums = part.sum(0);  // (9,)
  at::Tensor gw = sums.narrow(0, 0, kNumOps).clone();
  for (int q = 0; q < 2; ++q) {
    const int k = q == 0 ? kMaxPool : kAvgPool;
    const at::Tensor mean = stats[2 * q], inv = (stats[2 * q + 1] + eps).rsqrt();
    gw[k] = (inv * (part.select(1, k) - mean * part.select(1, kNumOps))).sum();
  }
  at::Tensor mask = at::zeros({kNumOps}, at::kDouble);  // built on the host: no device sync
  double* mp = mask.mutable_data_ptr<double>();
  for (int k = 1; k < kNumOps; ++k) mp[k] = op_active(active, k) ? 1.0 : 0.0;
  gw = (gw * mask.to(gw.device(), /*non_blocking=*/true)).to(x.scalar_type());
  std::vector<at::Tensor> grad_branches;
  for (int k = 0; k < kNumOps; ++k)
    if (slots[k].defined()) grad_branches.push_back(g * weights[k]);
  return {gx, gw, grad_branches};
}

}  // namespace hwnas

TORCH_LIBRARY_IMPL(hwnas, CUDA, m) {
  m.impl("dwconv", &hwnas::dwconv_cuda);
  m.impl("dwconv_backward", &hwnas::dwconv_backward_cuda);
  m.impl("combine", &hwnas::combine_cuda);
  m.impl("combine_backward", &hwnas::combine_backward_cuda);
}
