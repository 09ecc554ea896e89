// CPU-only channels-last (NHWC) kernels for training discrete networks (hwnas.train.fast_ops "fused").
//
// dwconv_nhwc           depthwise k x k convolution ('same' padding d * (k - 1) / 2, stride 1 or 2,
//                       dilation d) of relu(x) (relu_input) or x; x and the result are (N, C, H, W) tensors
//                       in channels-last memory, the weight is (C, 1, k, k). Same values as hwnas::dwconv.
// dwconv_nhwc_backward  (grad_input, grad_weight) of dwconv_nhwc.
// pool3x3_nhwc          3x3 max or average pooling (padding 1, stride 1 or 2), and its backward.
// bn_nhwc, cat_relu_nhwc  training-mode BatchNorm; relu(cat(xs, dim=1)); and their backwards.
//
// In NHWC a pixel's channels are contiguous, so every kernel tap is one vector multiply-add over C
// channels; the batch is split over threads (one parallel region per call), each thread working on
// whole images so the rows a tap reads stay in cache. The ReLU on the input is applied as it is read
// (forward, grad_weight) and as a mask on grad_input, so no rectified copy of x is ever stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "mixed_op.h"

namespace hwnas {
namespace {

struct NhwcGeom {
  int64_t n, c, h, w, k, s, d, p, ho, wo;
  NhwcGeom(const at::Tensor& x, int64_t k_, int64_t s_, int64_t d_)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), k(k_), s(s_), d(d_), p(d_ * (k_ - 1) / 2),
        ho(out_size(x.size(2), s_)), wo(out_size(x.size(3), s_)) {}
};

// The weight (C, 1, k, k) as (k * k, C): one contiguous channel vector per tap.
template <typename T>
std::vector<T> taps_by_channel(const at::Tensor& weight, int64_t c, int64_t kk) {
  const T* wd = weight.const_data_ptr<T>();
  std::vector<T> wt(kk * c);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t t = 0; t < kk; ++t) wt[t * c + ch] = wd[ch * kk + t];
  return wt;
}

// Per image a thread copies relu(x) (or x) into a zero-bordered NHWC buffer, so every tap of every
// output pixel is an unconditional read; at stride 1 the backward also copies grad_output into a
// zero-bordered buffer, so grad_input is the correlation of that buffer with the flipped kernel (stride 2:
// see backward_kernel). Channels go in blocks of CB (compile time, with the kernel size K): a block's
// K * K weights or partial sums stay in vector registers over a whole image. The buffers' borders are
// written once per thread and never touched again.
template <typename T>
struct PadBuf {
  int64_t hp, wp, c;
  std::vector<T> v;
  PadBuf(int64_t h, int64_t w, int64_t p, int64_t c_) : hp(h + 2 * p), wp(w + 2 * p), c(c_), v(hp * wp * c_, T(0)) {}
  T* at(int64_t i, int64_t j) { return v.data() + (i * wp + j) * c; }
};

template <typename T, bool RELU>
void load_padded(PadBuf<T>& buf, const T* src, int64_t h, int64_t w, int64_t p) {
  const int64_t c = buf.c;
  for (int64_t i = 0; i < h; ++i) {
    const T* row = src + i * w * c;
    T* dst = buf.at(i + p, p);
#pragma omp simd
    for (int64_t j = 0; j < w * c; ++j) dst[j] = RELU ? (row[j] > T(0) ? row[j] : T(0)) : row[j];
  }
}

template <typename T, int CB, int K, bool RELU>
void forward_kernel(const T* xd, const T* wt, T* od, const NhwcGeom& g) {
  const int64_t c = g.c;
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    PadBuf<T> pad(g.h, g.w, g.p, c);
    int64_t off[K * K];
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) off[kh * K + kw] = (kh * g.d * pad.wp + kw * g.d) * c;
    for (int64_t img = begin; img < end; ++img) {
      load_padded<T, RELU>(pad, xd + img * g.h * g.w * c, g.h, g.w, g.p);
      T* oi = od + img * g.ho * g.wo * c;
      for (int64_t c0 = 0; c0 < c; c0 += CB) {
        T wl[K * K][CB];
        for (int t = 0; t < K * K; ++t)
          for (int l = 0; l < CB; ++l) wl[t][l] = wt[t * c + c0 + l];
        for (int64_t oh = 0; oh < g.ho; ++oh) {
          for (int64_t ow = 0; ow < g.wo; ++ow) {
            const T* base = pad.at(oh * g.s, ow * g.s) + c0;
            T acc[CB] = {};
#pragma GCC unroll 49
            for (int t = 0; t < K * K; ++t) {
#pragma omp simd
              for (int l = 0; l < CB; ++l) acc[l] += wl[t][l] * base[off[t] + l];
            }
            T* op = oi + (oh * g.wo + ow) * c + c0;
#pragma omp simd
            for (int l = 0; l < CB; ++l) op[l] = acc[l];
          }
        }
      }
    }
  });
}

template <typename T, int CB, int K, bool RELU>
void backward_kernel(const T* gd, const T* xd, const T* wt, T* gxd, std::vector<T>& gw_part, const NhwcGeom& g) {
  const int64_t c = g.c;
  constexpr int KK = K * K;
  const int threads = at::get_num_threads();
  gw_part.assign(static_cast<size_t>(threads) * KK * c, T(0));
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    T* gw = gw_part.data() + static_cast<int64_t>(at::get_thread_num()) * KK * c;
    PadBuf<T> pad(g.h, g.w, g.p, c);   // relu(x), zero border p
    PadBuf<T> gpad(g.h, g.w, g.p, c);  // stride 1: grad_out at (oh + p, ow + p); stride 2: grad_input sums
    int64_t off[KK], goff[KK];
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) {
        off[kh * K + kw] = (kh * g.d * pad.wp + kw * g.d) * c;
        goff[kh * K + kw] = ((K - 1 - kh) * g.d * pad.wp + (K - 1 - kw) * g.d) * c;  // flipped kernel
      }
    for (int64_t img = begin; img < end; ++img) {
      const T* xi = xd + img * g.h * g.w * c;
      const T* gi = gd + img * g.ho * g.wo * c;
      T* gxi = gxd + img * g.h * g.w * c;
      load_padded<T, RELU>(pad, xi, g.h, g.w, g.p);
      if (g.s == 2) {
        // Stride 2: a zero-stuffed grad_out would make 3/4 of grad_input's products zero, so each output
        // pixel adds its taps' products into a bordered grad_input buffer instead, in the same loop as
        // grad_weight (same tap addresses); then the buffer's interior, ReLU-masked, is grad_input.
        std::fill(gpad.v.begin(), gpad.v.end(), T(0));
        for (int64_t c0 = 0; c0 < c; c0 += CB) {
          T wl[KK][CB];
          for (int t = 0; t < KK; ++t)
            for (int l = 0; l < CB; ++l) wl[t][l] = wt[t * c + c0 + l];
          T acc[KK][CB] = {};
          for (int64_t oh = 0; oh < g.ho; ++oh) {
            for (int64_t ow = 0; ow < g.wo; ++ow) {
              const T* base = pad.at(oh * g.s, ow * g.s) + c0;
              T* gbase = gpad.at(oh * g.s, ow * g.s) + c0;
              const T* gp = gi + (oh * g.wo + ow) * c + c0;
              T gv[CB];
#pragma omp simd
              for (int l = 0; l < CB; ++l) gv[l] = gp[l];
#pragma GCC unroll 49
              for (int t = 0; t < KK; ++t) {
#pragma omp simd
                for (int l = 0; l < CB; ++l) {
                  acc[t][l] += gv[l] * base[off[t] + l];
                  gbase[off[t] + l] += wl[t][l] * gv[l];
                }
              }
            }
          }
          for (int t = 0; t < KK; ++t)
            for (int l = 0; l < CB; ++l) gw[t * c + c0 + l] += acc[t][l];
        }
        for (int64_t ih = 0; ih < g.h; ++ih) {
          const T* src = gpad.at(ih + g.p, g.p);
          const T* xr = xi + ih * g.w * c;
          T* dst = gxi + ih * g.w * c;
#pragma omp simd
          for (int64_t j = 0; j < g.w * c; ++j) dst[j] = (!RELU || xr[j] > T(0)) ? src[j] : T(0);
        }
        continue;
      }
      for (int64_t oh = 0; oh < g.ho; ++oh) std::copy_n(gi + oh * g.wo * c, g.wo * c, gpad.at(oh + g.p, g.p));
      for (int64_t c0 = 0; c0 < c; c0 += CB) {
        // grad_weight: sum over output pixels of g * relu(x) at each tap.
        T acc[KK][CB] = {};
        for (int64_t oh = 0; oh < g.ho; ++oh) {
          for (int64_t ow = 0; ow < g.wo; ++ow) {
            const T* base = pad.at(oh, ow) + c0;
            const T* gp = gi + (oh * g.wo + ow) * c + c0;
            T gv[CB];
#pragma omp simd
            for (int l = 0; l < CB; ++l) gv[l] = gp[l];
#pragma GCC unroll 49
            for (int t = 0; t < KK; ++t) {
#pragma omp simd
              for (int l = 0; l < CB; ++l) acc[t][l] += gv[l] * base[off[t] + l];
            }
          }
        }
        for (int t = 0; t < KK; ++t)
          for (int l = 0; l < CB; ++l) gw[t * c + c0 + l] += acc[t][l];
        // grad_input: the bordered grad_out correlated with the flipped kernel, ReLU-masked.
        T wl[KK][CB];
        for (int t = 0; t < KK; ++t)
          for (int l = 0; l < CB; ++l) wl[t][l] = wt[t * c + c0 + l];
        for (int64_t ih = 0; ih < g.h; ++ih) {
          for (int64_t iw = 0; iw < g.w; ++iw) {
            const T* base = gpad.at(ih, iw) + c0;
            T a[CB] = {};
#pragma GCC unroll 49
            for (int t = 0; t < KK; ++t) {
#pragma omp simd
              for (int l = 0; l < CB; ++l) a[l] += wl[t][l] * base[goff[t] + l];
            }
            const int64_t o = (ih * g.w + iw) * c + c0;
            T* op = gxi + o;
            if (RELU) {
              const T* xp = xi + o;
#pragma omp simd
              for (int l = 0; l < CB; ++l) op[l] = xp[l] > T(0) ? a[l] : T(0);
            } else {
#pragma omp simd
              for (int l = 0; l < CB; ++l) op[l] = a[l];
            }
          }
        }
      }
    }
  });
}

// Calls f(cb, k, relu) with compile-time constants: the channel block CB (the largest of 16, 8, 4, 1
// dividing c), the kernel size (1, 3, 5 or 7) and the ReLU flag.
template <typename F>
void dispatch_nhwc(int64_t c, int64_t k, bool relu, F&& f) {
  auto with_k = [&](auto cb) {
    auto with_relu = [&](auto cb_, auto k_) {
      if (relu) return f(cb_, k_, std::true_type{});
      return f(cb_, k_, std::false_type{});
    };
    switch (k) {
      case 1: return with_relu(cb, std::integral_constant<int, 1>{});
      case 3: return with_relu(cb, std::integral_constant<int, 3>{});
      case 5: return with_relu(cb, std::integral_constant<int, 5>{});
      default: return with_relu(cb, std::integral_constant<int, 7>{});
    }
  };
  if (c % 16 == 0) return with_k(std::integral_constant<int, 16>{});
  if (c % 8 == 0) return with_k(std::integral_constant<int, 8>{});
  if (c % 4 == 0) return with_k(std::integral_constant<int, 4>{});
  return with_k(std::integral_constant<int, 1>{});
}

// BatchNorm (training) over the N * H * W rows of an NHWC tensor: threads take contiguous row ranges and
// keep per-channel partial sums (in double) that are added up after the region; a row's channels are
// one vector. Forward: sums of x and x^2, then the normalisation; backward: sums of g and g * (x - mean),
// then grad_input. Two passes each, against the three or more of ATen's channels-last kernels.
template <typename T>
void bn_forward_kernel(const T* xd, const T* wd, const T* bd, T* od, int64_t rows, int64_t c, double eps,
                       double* mean, double* var, double* invstd) {
  const int threads = at::get_num_threads();
  std::vector<double> part(static_cast<size_t>(threads) * 2 * c, 0.0);
  const int64_t grain_rows = std::max<int64_t>(1, 16384 / c);
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    double* s1 = part.data() + static_cast<int64_t>(at::get_thread_num()) * 2 * c;
    double* s2 = s1 + c;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xd + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const double v = xr[ch];
        s1[ch] += v;
        s2[ch] += v * v;
      }
    }
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double a = 0.0, b = 0.0;
    for (int t = 0; t < threads; ++t) {
      a += part[t * 2 * c + ch];
      b += part[t * 2 * c + c + ch];
    }
    mean[ch] = a / double(rows);
    var[ch] = std::max(0.0, b / double(rows) - mean[ch] * mean[ch]);
    invstd[ch] = 1.0 / std::sqrt(var[ch] + eps);
  }
  std::vector<T> scale(c), shift(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    scale[ch] = T(double(wd[ch]) * invstd[ch]);
    shift[ch] = T(double(bd[ch]) - mean[ch] * double(wd[ch]) * invstd[ch]);
  }
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xd + r * c;
      T* o = od + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = xr[ch] * scale[ch] + shift[ch];
    }
  });
}

template <typename T>
void bn_backward_kernel(const T* gd, const T* xd, const T* wd, const double* mean, const double* invstd, T* gxd,
                        int64_t rows, int64_t c, double* gw, double* gb) {
  const int threads = at::get_num_threads();
  std::vector<double> part(static_cast<size_t>(threads) * 2 * c, 0.0);
  std::vector<T> mu(c);
  for (int64_t ch = 0; ch < c; ++ch) mu[ch] = T(mean[ch]);
  const int64_t grain_rows = std::max<int64_t>(1, 16384 / c);
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    double* sg = part.data() + static_cast<int64_t>(at::get_thread_num()) * 2 * c;
    double* sgx = sg + c;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xd + r * c;
      const T* gr = gd + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const double gv = gr[ch];
        sg[ch] += gv;
        sgx[ch] += gv * double(xr[ch] - mu[ch]);
      }
    }
  });
  // grad_input = w * invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean)))
  std::vector<T> a(c), b(c), d(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    double s_g = 0.0, s_gx = 0.0;
    for (int t = 0; t < threads; ++t) {
      s_g += part[t * 2 * c + ch];
      s_gx += part[t * 2 * c + c + ch];
    }
    gb[ch] = s_g;
    gw[ch] = s_gx * invstd[ch];
    const double k = double(wd[ch]) * invstd[ch];
    a[ch] = T(k);                                                          // * g
    b[ch] = T(-k * invstd[ch] * invstd[ch] * s_gx / double(rows));         // * (x - mean)
    d[ch] = T(-k * s_g / double(rows));                                    // constant
  }
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xd + r * c;
      const T* gr = gd + r * c;
      T* o = gxd + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = a[ch] * gr[ch] + b[ch] * (xr[ch] - mu[ch]) + d[ch];
    }
  });
}

template <typename T>
void cat_relu_kernel(const std::vector<at::Tensor>& xs, at::Tensor& out, int64_t pixels, int64_t ctot) {
  std::vector<const T*> src;
  std::vector<int64_t> cs;
  for (const auto& t : xs) {
    src.push_back(t.const_data_ptr<T>());
    cs.push_back(t.size(1));
  }
  T* od = out.mutable_data_ptr<T>();
  at::parallel_for(0, pixels, std::max<int64_t>(1, 16384 / ctot), [&](int64_t begin, int64_t end) {
    for (int64_t px = begin; px < end; ++px) {
      T* o = od + px * ctot;
      for (size_t i = 0; i < src.size(); ++i) {
        const T* a = src[i] + px * cs[i];
        const int64_t c = cs[i];
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) o[ch] = a[ch] > T(0) ? a[ch] : T(0);
        o += c;
      }
    }
  });
}

template <typename T>
void cat_relu_backward_kernel(const at::Tensor& g, const at::Tensor& out, std::vector<at::Tensor>& grads,
                              at::IntArrayRef channels, int64_t pixels, int64_t ctot) {
  std::vector<T*> dst;
  for (auto& t : grads) dst.push_back(t.mutable_data_ptr<T>());
  const T* gd = g.const_data_ptr<T>();
  const T* od = out.const_data_ptr<T>();
  at::parallel_for(0, pixels, std::max<int64_t>(1, 16384 / ctot), [&](int64_t begin, int64_t end) {
    for (int64_t px = begin; px < end; ++px) {
      const T* gp = gd + px * ctot;
      const T* op = od + px * ctot;
      for (size_t i = 0; i < dst.size(); ++i) {
        const int64_t c = channels[i];
        T* d = dst[i] + px * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) d[ch] = op[ch] > T(0) ? gp[ch] : T(0);
        gp += c;
        op += c;
      }
    }
  });
}

// 3x3 pooling with padding 1, stride 1 or 2, of NHWC tensors: the maximum (padding never wins; NaN does, as
// in ATen) or the mean over the in-bounds taps (count_include_pad=False, the search space's avg_pool_3x3).
// A window's taps are whole channel vectors, so each tap is one vector max or add. The max backward finds
// each window's winner again from x (the first maximum in row-major order, ATen's choice) instead of reading
// ATen's int64 index per output value, and adds the output gradient there; the average backward gathers,
// for each input pixel, the output gradients of the windows that cover it, so grad_input is written once.
struct PoolGeom {
  int64_t n, c, h, w, s, ho, wo;
  PoolGeom(const at::Tensor& x, int64_t s_)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), s(s_), ho(out_size(x.size(2), s_)),
        wo(out_size(x.size(3), s_)) {}
  // The input rows (or columns) window o covers: [o * s - 1, o * s + 1] clipped to [0, size).
  int64_t lo(int64_t o) const { return std::max<int64_t>(o * s - 1, 0); }
  int64_t hi(int64_t o, int64_t size) const { return std::min<int64_t>(o * s + 1, size - 1); }
};

// Whether v replaces best as a window's maximum: larger, or NaN (ATen's max pool lets NaN win).
// v != v is the NaN test: std::isnan here keeps the loops from vectorizing.
template <typename T>
inline bool beats(T v, T best) {
  return v > best || v != v;
}

template <typename T, bool MAX>
void pool_forward_kernel(const T* xd, T* od, const PoolGeom& g) {
  const int64_t c = g.c;
  at::parallel_for(0, g.n * g.ho, std::max<int64_t>(1, 16384 / (g.wo * c)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // one output row of one image
      const T* x = xd + (r / g.ho) * g.h * g.w * c;
      const int64_t oi = r % g.ho, i0 = g.lo(oi), i1 = g.hi(oi, g.h);
      T* o = od + r * g.wo * c;
      for (int64_t oj = 0; oj < g.wo; ++oj, o += c) {
        const int64_t j0 = g.lo(oj), j1 = g.hi(oj, g.w);
        const T* first = x + (i0 * g.w + j0) * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) o[ch] = first[ch];
        for (int64_t i = i0; i <= i1; ++i)
          for (int64_t j = (i == i0 ? j0 + 1 : j0); j <= j1; ++j) {
            const T* t = x + (i * g.w + j) * c;
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) o[ch] = MAX ? (beats(t[ch], o[ch]) ? t[ch] : o[ch]) : o[ch] + t[ch];
          }
        if (!MAX) {
          const T count = static_cast<T>((i1 - i0 + 1) * (j1 - j0 + 1));
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) o[ch] /= count;
        }
      }
    }
  });
}

template <typename T>
void max_pool_backward_kernel(const T* gd, const T* xd, T* gxd, const PoolGeom& g) {
  const int64_t c = g.c, plane = g.h * g.w * c;
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> best_v(c);
    std::vector<int32_t> win_v(c);  // per channel: the winning tap's number in the window, row-major
    T* best = best_v.data();
    int32_t* win = win_v.data();
    for (int64_t img = begin; img < end; ++img) {
      const T* x = xd + img * plane;
      const T* gr = gd + img * g.ho * g.wo * c;
      T* gx = gxd + img * plane;
      std::fill(gx, gx + plane, T(0));
      for (int64_t oi = 0; oi < g.ho; ++oi)
        for (int64_t oj = 0; oj < g.wo; ++oj, gr += c) {
          const int64_t i0 = g.lo(oi), i1 = g.hi(oi, g.h), j0 = g.lo(oj), j1 = g.hi(oj, g.w);
          const T* first = x + (i0 * g.w + j0) * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) {
            best[ch] = first[ch];
            win[ch] = 0;
          }
          int32_t tap = 0;
          for (int64_t i = i0; i <= i1; ++i)
            for (int64_t j = (i == i0 ? j0 + 1 : j0); j <= j1; ++j) {
              const T* v = x + (i * g.w + j) * c;
              ++tap;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) {
                const bool wins = beats(v[ch], best[ch]);
                best[ch] = wins ? v[ch] : best[ch];
                win[ch] = wins ? tap : win[ch];
              }
            }
          tap = 0;
          for (int64_t i = i0; i <= i1; ++i)
            for (int64_t j = j0; j <= j1; ++j, ++tap) {
              T* d = gx + (i * g.w + j) * c;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) d[ch] += win[ch] == tap ? gr[ch] : T(0);
            }
        }
    }
  });
}

template <typename T>
void avg_pool_backward_kernel(const T* gd, T* gxd, const PoolGeom& g) {
  const int64_t c = g.c;
  // Input row i lies in the windows of output rows ceil((i - 1) / s) .. floor((i + 1) / s).
  auto first_out = [&](int64_t i) { return std::max<int64_t>((i - 1 + g.s - 1) / g.s, 0); };
  auto last_out = [&](int64_t i, int64_t n_out) { return std::min<int64_t>((i + 1) / g.s, n_out - 1); };
  at::parallel_for(0, g.n * g.h, std::max<int64_t>(1, 16384 / (g.w * c)), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(c);
    for (int64_t r = begin; r < end; ++r) {  // one input row of one image
      const int64_t img = r / g.h, i = r % g.h;
      const T* gr = gd + img * g.ho * g.wo * c;
      T* gx = gxd + r * g.w * c;
      const int64_t oi0 = first_out(i), oi1 = last_out(i, g.ho);
      for (int64_t j = 0; j < g.w; ++j, gx += c) {
        const int64_t oj0 = first_out(j), oj1 = last_out(j, g.wo);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t oi = oi0; oi <= oi1; ++oi)
          for (int64_t oj = oj0; oj <= oj1; ++oj) {
            const T inv = T(1) / static_cast<T>((g.hi(oi, g.h) - g.lo(oi) + 1) * (g.hi(oj, g.w) - g.lo(oj) + 1));
            const T* t = gr + (oi * g.wo + oj) * c;
            T* a = acc.data();
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) a[ch] += t[ch] * inv;
          }
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) gx[ch] = acc[ch];
      }
    }
  });
}

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

void check_pool(const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) > 0 && x.size(3) > 0 && x.device().is_cpu(),
              "hwnas.pool3x3_nhwc: x must be a non-empty (N, C, H, W) CPU tensor, got ", x.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "hwnas.pool3x3_nhwc: stride must be 1 or 2, got ", stride);
}

void check_nhwc(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation) {
  check_dwconv(x, weight, stride, dilation);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "hwnas.dwconv_nhwc: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(weight.size(2) <= 7, "hwnas.dwconv_nhwc: kernel sizes up to 7, got ", weight.size(2));
  TORCH_CHECK(x.device().is_cpu(), "hwnas.dwconv_nhwc is a CPU kernel, x is on ", x.device());
}

}  // namespace

at::Tensor dwconv_nhwc_cpu(const at::Tensor& x_, const at::Tensor& weight, int64_t stride, int64_t dilation,
                           bool relu_input) {
  check_nhwc(x_, weight, stride, dilation);
  const at::Tensor x = channels_last(x_);
  const NhwcGeom g(x, weight.size(2), stride, dilation);
  at::Tensor out = at::empty({g.n, g.c, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_nhwc_cpu", [&] {
    const auto wt = taps_by_channel<scalar_t>(weight.contiguous(), g.c, g.k * g.k);
    dispatch_nhwc(g.c, g.k, relu_input, [&](auto cb, auto k, auto relu) {
      forward_kernel<scalar_t, decltype(cb)::value, decltype(k)::value, decltype(relu)::value>(
          x.const_data_ptr<scalar_t>(), wt.data(), out.mutable_data_ptr<scalar_t>(), g);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv_nhwc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                            const at::Tensor& weight, int64_t stride,
                                                            int64_t dilation, bool relu_input) {
  check_nhwc(x_, weight, stride, dilation);
  const at::Tensor x = channels_last(x_), g_ = channels_last(grad_out);
  const NhwcGeom g(x, weight.size(2), stride, dilation);
  TORCH_CHECK(g_.dim() == 4 && g_.size(0) == g.n && g_.size(1) == g.c && g_.size(2) == g.ho && g_.size(3) == g.wo,
              "hwnas.dwconv_nhwc_backward: grad_out has shape ", g_.sizes(), " which does not match x ", x.sizes());
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor gw = at::empty_like(weight, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_nhwc_backward_cpu", [&] {
    const int64_t kk = g.k * g.k;
    const auto wt = taps_by_channel<scalar_t>(weight.contiguous(), g.c, kk);
    std::vector<scalar_t> part;
    dispatch_nhwc(g.c, g.k, relu_input, [&](auto cb, auto k, auto relu) {
      backward_kernel<scalar_t, decltype(cb)::value, decltype(k)::value, decltype(relu)::value>(
          g_.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wt.data(), gx.mutable_data_ptr<scalar_t>(),
          part, g);
    });
    scalar_t* gwd = gw.mutable_data_ptr<scalar_t>();
    const int64_t threads = static_cast<int64_t>(part.size()) / (kk * g.c);
    for (int64_t ch = 0; ch < g.c; ++ch)
      for (int64_t t = 0; t < kk; ++t) {
        scalar_t acc = scalar_t(0);
        for (int64_t th = 0; th < threads; ++th) acc += part[(th * kk + t) * g.c + ch];
        gwd[ch * kk + t] = acc;
      }
  });
  return {gx, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_nhwc_cpu(const at::Tensor& x_, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps) {
  TORCH_CHECK(x_.dim() == 4 && x_.device().is_cpu(), "hwnas.bn_nhwc: x must be a (N, C, H, W) CPU tensor");
  const int64_t c = x_.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c && bias.dim() == 1 && bias.size(0) == c,
              "hwnas.bn_nhwc: weight and bias must be (", c, ",)");
  TORCH_CHECK(weight.scalar_type() == x_.scalar_type() && bias.scalar_type() == x_.scalar_type(),
              "hwnas.bn_nhwc: weight and bias must have x's dtype");
  const at::Tensor x = channels_last(x_), w = weight.contiguous(), b = bias.contiguous();
  const int64_t rows = x.numel() / std::max<int64_t>(1, c);
  TORCH_CHECK(rows > 0, "hwnas.bn_nhwc: empty input");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({c}, f64), var = at::empty({c}, f64), invstd = at::empty({c}, f64);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_bn_nhwc_cpu", [&] {
    bn_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, c, eps,
                                mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>(),
                                invstd.mutable_data_ptr<double>());
  });
  return {out, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_nhwc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                    const at::Tensor& weight, const at::Tensor& mean,
                                                                    const at::Tensor& invstd) {
  const int64_t c = x_.size(1);
  const at::Tensor x = channels_last(x_), g = channels_last(grad_out), w = weight.contiguous();
  TORCH_CHECK(g.sizes() == x.sizes(), "hwnas.bn_nhwc_backward: grad_out has shape ", g.sizes(), ", x ", x.sizes());
  const at::Tensor m = mean.to(at::kDouble).contiguous(), is = invstd.to(at::kDouble).contiguous();
  TORCH_CHECK(m.numel() == c && is.numel() == c, "hwnas.bn_nhwc_backward: mean and invstd must have C values");
  const int64_t rows = x.numel() / std::max<int64_t>(1, c);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor gw = at::empty({c}, f64), gb = at::empty({c}, f64);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_bn_nhwc_backward_cpu", [&] {
    bn_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<scalar_t>(), m.const_data_ptr<double>(), is.const_data_ptr<double>(),
                                 gx.mutable_data_ptr<scalar_t>(), rows, c, gw.mutable_data_ptr<double>(),
                                 gb.mutable_data_ptr<double>());
  });
  return {gx, gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

// relu(cat(xs, dim=1)) of channels-last tensors in one pass (the cell output as its consumers read it), and
// its backward: each input's gradient, masked where the output is zero, written channels-last.
at::Tensor cat_relu_nhwc_cpu(at::TensorList xs_) {
  TORCH_CHECK(!xs_.empty(), "hwnas.cat_relu_nhwc: no inputs");
  std::vector<at::Tensor> xs;
  int64_t ctot = 0;
  for (const auto& t : xs_) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == xs_[0].size(0) && t.size(2) == xs_[0].size(2) &&
                    t.size(3) == xs_[0].size(3) && t.scalar_type() == xs_[0].scalar_type() && t.device().is_cpu(),
                "hwnas.cat_relu_nhwc: inputs must be CPU (N, C_i, H, W) tensors of one dtype and size");
    xs.push_back(channels_last(t));
    ctot += t.size(1);
  }
  const at::Tensor& x0 = xs[0];
  at::Tensor out = at::empty({x0.size(0), ctot, x0.size(2), x0.size(3)},
                             x0.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t pixels = x0.size(0) * x0.size(2) * x0.size(3);
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "hwnas_cat_relu_nhwc_cpu",
                             [&] { cat_relu_kernel<scalar_t>(xs, out, pixels, ctot); });
  return out;
}

std::vector<at::Tensor> cat_relu_nhwc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out_,
                                                   at::IntArrayRef channels) {
  const at::Tensor g = channels_last(grad_out), out = channels_last(out_);
  TORCH_CHECK(g.sizes() == out.sizes(), "hwnas.cat_relu_nhwc_backward: grad_out ", g.sizes(), " vs out ", out.sizes());
  int64_t ctot = 0;
  for (int64_t c : channels) ctot += c;
  TORCH_CHECK(ctot == out.size(1), "hwnas.cat_relu_nhwc_backward: channels sum to ", ctot, ", out has ", out.size(1));
  std::vector<at::Tensor> grads;
  for (int64_t c : channels)
    grads.push_back(at::empty({out.size(0), c, out.size(2), out.size(3)},
                              out.options().memory_format(at::MemoryFormat::ChannelsLast)));
  const int64_t pixels = out.size(0) * out.size(2) * out.size(3);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hwnas_cat_relu_nhwc_backward_cpu",
                             [&] { cat_relu_backward_kernel<scalar_t>(g, out, grads, channels, pixels, ctot); });
  return grads;
}

// pool3x3_nhwc: max or average (count_include_pad=False) 3x3 pooling, padding 1, stride 1 or 2, channels-last.
at::Tensor pool3x3_nhwc_cpu(const at::Tensor& x_, int64_t stride, bool is_max) {
  check_pool(x_, stride);
  const at::Tensor x = channels_last(x_);
  const PoolGeom g(x, stride);
  at::Tensor out = at::empty({g.n, g.c, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_pool3x3_nhwc_cpu", [&] {
    if (is_max)
      pool_forward_kernel<scalar_t, true>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g);
    else
      pool_forward_kernel<scalar_t, false>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g);
  });
  return out;
}

at::Tensor pool3x3_nhwc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_, int64_t stride, bool is_max) {
  check_pool(x_, stride);
  const at::Tensor x = channels_last(x_), gr = channels_last(grad_out);
  const PoolGeom g(x, stride);
  TORCH_CHECK(gr.dim() == 4 && gr.size(0) == g.n && gr.size(1) == g.c && gr.size(2) == g.ho && gr.size(3) == g.wo,
              "hwnas.pool3x3_nhwc_backward: grad_out has shape ", gr.sizes(), " which does not match x ", x.sizes());
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_pool3x3_nhwc_backward_cpu", [&] {
    if (is_max)
      max_pool_backward_kernel<scalar_t>(gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         gx.mutable_data_ptr<scalar_t>(), g);
    else
      avg_pool_backward_kernel<scalar_t>(gr.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), g);
  });
  return gx;
}

}  // namespace hwnas

TORCH_LIBRARY_FRAGMENT(hwnas, m) {
  m.def("dwconv_nhwc(Tensor x, Tensor weight, int stride, int dilation, bool relu_input) -> Tensor");
  m.def(
      "dwconv_nhwc_backward(Tensor grad_out, Tensor x, Tensor weight, int stride, int dilation, bool relu_input)"
      " -> (Tensor, Tensor)");
  m.def("cat_relu_nhwc(Tensor[] xs) -> Tensor");
  m.def("cat_relu_nhwc_backward(Tensor grad_out, Tensor out, int[] channels) -> Tensor[]");
  m.def("pool3x3_nhwc(Tensor x, int stride, bool is_max) -> Tensor");
  m.def("pool3x3_nhwc_backward(Tensor grad_out, Tensor x, int stride, bool is_max) -> Tensor");
  m.def("bn_nhwc(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_nhwc_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor invstd)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hwnas, CPU, m) {
  m.impl("dwconv_nhwc", &hwnas::dwconv_nhwc_cpu);
  m.impl("dwconv_nhwc_backward", &hwnas::dwconv_nhwc_backward_cpu);
  m.impl("bn_nhwc", &hwnas::bn_nhwc_cpu);
  m.impl("cat_relu_nhwc", &hwnas::cat_relu_nhwc_cpu);
  m.impl("cat_relu_nhwc_backward", &hwnas::cat_relu_nhwc_backward_cpu);
  m.impl("bn_nhwc_backward", &hwnas::bn_nhwc_backward_cpu);
  m.impl("pool3x3_nhwc", &hwnas::pool3x3_nhwc_cpu);
  m.impl("pool3x3_nhwc_backward", &hwnas::pool3x3_nhwc_backward_cpu);
}
