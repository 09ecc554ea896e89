// CPU (OpenMP via at::parallel_for) implementations of the hwnas:: MixedOp operators.
//
// Every kernel works on whole (H, W) planes held by one thread, so inner loops run over contiguous
// rows and vectorize; depthwise convs parallelize over the N*C planes, the combine over channels
// (BatchNorm statistics need all N planes of a channel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixed_op.h"

namespace hwnas {
namespace {

// Work (elements) below which a parallel chunk is not worth waking another thread for.
constexpr int64_t kGrainElems = 16384;
inline int64_t grain(int64_t elems_per_item) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item)); }

// ---------------------------------------------------------------------------------------------------
// Depthwise convolution.
//
// A plane is zero-padded once (ReLU applied on the way) and every kernel tap becomes a pointer into
// it; outputs are computed in a "flat" layout whose rows have the padded row stride, so the whole plane
// is one long loop over contiguous memory (a few junk columns per row are dropped afterwards). Stride 2
// splits the padded plane into even and odd columns so its loads stay contiguous too. The same tap
// pointers give grad_weight as dot products, and grad_input is the forward correlation of the
// zero-stuffed, padded grad_output with the flipped kernel.

template <typename T>
struct DwPlane {
  int64_t h, w, k, d, s, p, hp, wp, ho, wo;
  int64_t cols;  // row stride of each source array (wp, or ceil(wp / 2) for stride 2)
  int64_t rs;    // row stride of the flat output layout
  int64_t len;   // flat output length: (ho - 1) * rs + wo
  int64_t src_size;
  std::vector<T> src;  // stride 1: padded plane; stride 2: even columns then odd columns

  DwPlane(int64_t h_, int64_t w_, int64_t k_, int64_t d_, int64_t s_)
      : h(h_), w(w_), k(k_), d(d_), s(s_), p(d_ * (k_ - 1) / 2), hp(h_ + 2 * p), wp(w_ + 2 * p),
        ho(out_size(h_, s_)), wo(out_size(w_, s_)) {
    cols = s == 1 ? wp : (wp + 1) / 2;
    rs = s == 1 ? wp : 2 * cols;
    len = (ho - 1) * rs + wo;
    src_size = hp * cols + cols + 16;  // slack: junk columns may read past the last row
    src.assign(s * src_size, T(0));
  }

  // Loads plane x (h, w) into the padded source, applying ReLU if asked. Borders stay zero.
  void load(const T* x, bool relu) {
    for (int64_t i = 0; i < h; ++i) {
      const T* row = x + i * w;
      if (s == 1) {
        T* dst = src.data() + (i + p) * wp + p;
        if (relu) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) dst[j] = row[j] > T(0) ? row[j] : T(0);
        } else {
          std::copy(row, row + w, dst);
        }
      } else {
        T* even = src.data() + (i + p) * cols;
        T* odd = even + src_size;
        for (int64_t j = 0; j < w; ++j) {
          const int64_t c = j + p;
          const T v = relu ? (row[j] > T(0) ? row[j] : T(0)) : row[j];
          ((c & 1) ? odd : even)[c >> 1] = v;
        }
      }
    }
  }

  // Pointer per tap such that tap t of output flat index i reads taps[t][i].
  void taps(const T** out) const {
    for (int64_t kh = 0; kh < k; ++kh)
      for (int64_t kw = 0; kw < k; ++kw) {
        const int64_t off = kw * d;
        out[kh * k + kw] = s == 1 ? src.data() + kh * d * wp + off
                                  : src.data() + (off & 1) * src_size + kh * d * cols + (off >> 1);
      }
  }
};

// dst[i] = sum_t wt[t] * taps[t][i], one kernel row (K taps) per pass so the taps and weights of a
// pass stay in registers.
template <typename T, int K>
void correlate(const T* const* taps, const T* wt, T* dst, int64_t len) {
  for (int kh = 0; kh < K; ++kh) {
    T wl[K];
    const T* tp[K];
    for (int t = 0; t < K; ++t) {
      wl[t] = wt[kh * K + t];
      tp[t] = taps[kh * K + t];
    }
    const bool first = kh == 0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      T acc = first ? T(0) : dst[i];
#pragma GCC unroll 8
      for (int t = 0; t < K; ++t) acc += wl[t] * tp[t][i];
      dst[i] = acc;
    }
  }
}

template <typename T>
void correlate_any(const T* const* taps, const T* wt, T* dst, int64_t len, int64_t kk) {
  switch (kk) {
    case 1: return correlate<T, 1>(taps, wt, dst, len);
    case 9: return correlate<T, 3>(taps, wt, dst, len);
    case 25: return correlate<T, 5>(taps, wt, dst, len);
    case 49: return correlate<T, 7>(taps, wt, dst, len);
    default:
      std::fill(dst, dst + len, T(0));
      for (int64_t t = 0; t < kk; ++t) {
        const T wv = wt[t];
        const T* src = taps[t];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) dst[i] += wv * src[i];
      }
  }
}

// out[t] = sum_i g[i] * taps[t][i]: K taps per pass, each with a block of partial sums kept in
// registers (a single reduction chain would be latency-bound).
template <typename T, int K>
void tap_dots(const T* g, const T* const* taps, T* out, int64_t len) {
  constexpr int V = 16;
  for (int kh = 0; kh < K; ++kh) {
    const T* tp[K];
    for (int t = 0; t < K; ++t) tp[t] = taps[kh * K + t];
    T part[K][V] = {};
    int64_t i = 0;
    for (; i + V <= len; i += V) {
#pragma GCC unroll 8
      for (int t = 0; t < K; ++t) {
#pragma omp simd
        for (int l = 0; l < V; ++l) part[t][l] += g[i + l] * tp[t][i + l];
      }
    }
    for (int t = 0; t < K; ++t) {
      T acc = T(0);
      for (int l = 0; l < V; ++l) acc += part[t][l];
      for (int64_t j = i; j < len; ++j) acc += g[j] * tp[t][j];
      out[kh * K + t] = acc;
    }
  }
}

template <typename T>
void tap_dots_any(const T* g, const T* const* taps, T* out, int64_t len, int64_t kk) {
  switch (kk) {
    case 1: return tap_dots<T, 1>(g, taps, out, len);
    case 9: return tap_dots<T, 3>(g, taps, out, len);
    case 25: return tap_dots<T, 5>(g, taps, out, len);
    case 49: return tap_dots<T, 7>(g, taps, out, len);
    default:
      for (int64_t t = 0; t < kk; ++t) {
        T acc = T(0);
        for (int64_t i = 0; i < len; ++i) acc += g[i] * taps[t][i];
        out[t] = acc;
      }
  }
}

template <typename T>
void dwconv_forward_kernel(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, int64_t s, int64_t d,
                           bool relu) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = weight.size(2);
  const T* xd = x.const_data_ptr<T>();
  const T* wd = weight.const_data_ptr<T>();
  T* od = out.mutable_data_ptr<T>();
  at::parallel_for(0, n * c, grain(h * w * k), [&](int64_t begin, int64_t end) {
    DwPlane<T> pl(h, w, k, d, s);
    std::vector<const T*> taps(k * k);
    pl.taps(taps.data());
    std::vector<T> flat(pl.len);
    for (int64_t plane = begin; plane < end; ++plane) {
      pl.load(xd + plane * h * w, relu);
      correlate_any(taps.data(), wd + (plane % c) * k * k, flat.data(), pl.len, k * k);
      T* o = od + plane * pl.ho * pl.wo;
      for (int64_t oh = 0; oh < pl.ho; ++oh) std::copy_n(flat.data() + oh * pl.rs, pl.wo, o + oh * pl.wo);
    }
  });
}

template <typename T>
void dwconv_backward_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::Tensor& gx,
                            at::Tensor& gw_planes, int64_t s, int64_t d, bool relu) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = weight.size(2), kk = k * k;
  const T* gd = g.const_data_ptr<T>();
  const T* xd = x.const_data_ptr<T>();
  const T* wd = weight.const_data_ptr<T>();
  T* gxd = gx.mutable_data_ptr<T>();
  T* gwd = gw_planes.mutable_data_ptr<T>();
  at::parallel_for(0, n * c, grain(h * w * k), [&](int64_t begin, int64_t end) {
    DwPlane<T> pl(h, w, k, d, s);  // relu(x), for grad_weight
    DwPlane<T> gp(h, w, k, d, 1);  // zero-stuffed grad_out, for grad_input
    std::vector<const T*> xt(kk), gt(kk);
    pl.taps(xt.data());
    gp.taps(gt.data());
    std::vector<T> gflat(pl.len + 16, T(0)), gxflat(gp.len), wflip(kk);
    const int64_t ho = pl.ho, wo = pl.wo, p = pl.p;
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* xs = xd + plane * h * w;
      const T* gs = gd + plane * ho * wo;
      const T* wt = wd + (plane % c) * kk;
      pl.load(xs, relu);
      for (int64_t oh = 0; oh < ho; ++oh) {
        std::copy_n(gs + oh * wo, wo, gflat.data() + oh * pl.rs);
        for (int64_t ow = 0; ow < wo; ++ow) gp.src[(p + s * oh) * gp.wp + p + s * ow] = gs[oh * wo + ow];
      }
      tap_dots_any(gflat.data(), xt.data(), gwd + plane * kk, pl.len, kk);
      for (int64_t t = 0; t < kk; ++t) wflip[t] = wt[kk - 1 - t];
      correlate_any(gt.data(), wflip.data(), gxflat.data(), gp.len, kk);
      T* gxs = gxd + plane * h * w;
      for (int64_t i = 0; i < h; ++i) {
        const T* gi = gxflat.data() + i * gp.rs;
        const T* xi = xs + i * w;
        T* go = gxs + i * w;
        if (relu) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) go[j] = xi[j] > T(0) ? gi[j] : T(0);
        } else {
          std::copy_n(gi, w, go);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Combine: 3x3 pools (padding 1) of one plane, separable: a horizontal pass over rows copied into
// buffers with a one-element border (-inf for max, 0 for sum), then a vertical pass over rows with a
// one-row border. The max pass also records which window position held the maximum (code 3 * di + dj,
// the first maximum in row-major order, as ATen picks it), so the backward routes the max-pool
// gradient without searching the window again. The backward recomputes the pools of a channel into a
// per-thread buffer rather than reading them from a cache the forward wrote: the pools cost a few
// vector operations per value, storing and reloading them costs memory traffic, and the kernel is
// bound by memory traffic (measured: forward -25 %, backward -10 % against a (3, N, C, Ho, Wo) cache).

struct PoolGeom {
  int64_t h, w, s, ho, wo;
  std::vector<double> inv_cnt;  // 1 / valid window size per output (count_include_pad=False)
  PoolGeom(int64_t h_, int64_t w_, int64_t s_) : h(h_), w(w_), s(s_), ho(out_size(h_, s_)), wo(out_size(w_, s_)) {
    inv_cnt.resize(ho * wo);
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t rows = std::min<int64_t>(oh * s + 1, h - 1) - std::max<int64_t>(oh * s - 1, 0) + 1;
        const int64_t cols = std::min<int64_t>(ow * s + 1, w - 1) - std::max<int64_t>(ow * s - 1, 0) + 1;
        inv_cnt[oh * wo + ow] = 1.0 / double(rows * cols);
      }
  }
};

template <typename T>
struct PoolScratch {
  // hmax/hsum/hcode: horizontal results of padded rows 0..h+1 (rows 0 and h+1 are the border)
  std::vector<T> rmax, rsum, hmax, hsum, hcode, icnt, gxpad, gpm, gpa;
  explicit PoolScratch(const PoolGeom& g) {
    const T ninf = -std::numeric_limits<T>::infinity();
    rmax.assign(g.w + 3, ninf);
    rsum.assign(g.w + 3, T(0));
    hmax.assign((g.h + 2) * g.wo, ninf);
    hsum.assign((g.h + 2) * g.wo, T(0));
    hcode.assign((g.h + 2) * g.wo, T(0));
    icnt.assign(g.inv_cnt.begin(), g.inv_cnt.end());
    gxpad.resize((g.h + 3) * (g.w + 2));
    gpm.resize(g.ho * g.wo);
    gpa.resize(g.ho * g.wo);
  }
};

// Max and average pool of plane x, plus the window code of each maximum.
template <typename T>
void pool_plane(const T* x, const PoolGeom& g, PoolScratch<T>& sc, T* maxo, T* avgo, T* codeo) {
  const int64_t wo = g.wo, s = g.s;
  for (int64_t i = 0; i < g.h; ++i) {
    std::copy_n(x + i * g.w, g.w, sc.rmax.data() + 1);
    std::copy_n(x + i * g.w, g.w, sc.rsum.data() + 1);
    const T* rm = sc.rmax.data();
    const T* rsu = sc.rsum.data();
    T* hm = sc.hmax.data() + (i + 1) * wo;
    T* hs = sc.hsum.data() + (i + 1) * wo;
    T* hc = sc.hcode.data() + (i + 1) * wo;
    if (s == 1) {
#pragma omp simd
      for (int64_t ow = 0; ow < wo; ++ow) {
        T a = rm[ow], c = T(0);
        const T b1 = rm[ow + 1], b2 = rm[ow + 2];
        c = b1 > a ? T(1) : c;
        a = b1 > a ? b1 : a;
        c = b2 > a ? T(2) : c;
        a = b2 > a ? b2 : a;
        hm[ow] = a;
        hc[ow] = c;
        hs[ow] = rsu[ow] + rsu[ow + 1] + rsu[ow + 2];
      }
    } else {
      for (int64_t ow = 0; ow < wo; ++ow) {
        T a = rm[2 * ow], c = T(0);
        const T b1 = rm[2 * ow + 1], b2 = rm[2 * ow + 2];
        c = b1 > a ? T(1) : c;
        a = b1 > a ? b1 : a;
        c = b2 > a ? T(2) : c;
        a = b2 > a ? b2 : a;
        hm[ow] = a;
        hc[ow] = c;
        hs[ow] = rsu[2 * ow] + rsu[2 * ow + 1] + rsu[2 * ow + 2];
      }
    }
  }
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    const int64_t r = oh * s;  // padded row of the window's first row
    const T* m0 = sc.hmax.data() + r * wo;
    const T* m1 = m0 + wo;
    const T* m2 = m1 + wo;
    const T* c0 = sc.hcode.data() + r * wo;
    const T* c1 = c0 + wo;
    const T* c2 = c1 + wo;
    const T* s0 = sc.hsum.data() + r * wo;
    const T* s1 = s0 + wo;
    const T* s2 = s1 + wo;
    const T* ic = sc.icnt.data() + oh * wo;
    T* mo = maxo + oh * wo;
    T* ao = avgo + oh * wo;
    T* co = codeo + oh * wo;
#pragma omp simd
    for (int64_t ow = 0; ow < wo; ++ow) {
      // Every load unconditional, so the selects if-convert to blends on AVX2 too (not only with AVX-512 masks).
      const T v1 = m1[ow], v2 = m2[ow], k1 = T(3) + c1[ow], k2 = T(6) + c2[ow];
      T a = m0[ow], c = c0[ow];
      c = v1 > a ? k1 : c;
      a = v1 > a ? v1 : a;
      c = v2 > a ? k2 : c;
      a = v2 > a ? v2 : a;
      mo[ow] = a;
      co[ow] = c;
      ao[ow] = (s0[ow] + s1[ow] + s2[ow]) * ic[ow];
    }
  }
}

// Mean and biased variance over n planes of len values each (two passes, double accumulation in
// several lanes so the sums vectorize instead of forming one long dependency chain).
template <typename T, typename Plane>
void moments(Plane plane, int64_t n, int64_t len, double& mean, double& var) {
  double sum = 0;
  for (int64_t b = 0; b < n; ++b) {
    const T* v = plane(b);
    double a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < len; ++i) a += double(v[i]);
    sum += a;
  }
  mean = sum / double(n * len);
  double sq = 0;
  for (int64_t b = 0; b < n; ++b) {
    const T* v = plane(b);
    double a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < len; ++i) {
      const double d = double(v[i]) - mean;
      a += d * d;
    }
    sq += a;
  }
  var = sq / double(n * len);
}

// Writes the pool gradients of one plane, plus w_skip * g for the stride-1 identity, to gx: gmax goes to
// the window position its code names, gavg (already divided by the window size) to every window position
// (padding positions collect junk that is cropped away). Nine passes, one per window position, over
// contiguous rows (stride 1), so the masked adds vectorize. Returns sum(g * x) for the identity's weight.
template <typename T>
T pool_backward_plane(const T* code, const T* gmax, const T* gavg, T* gx, const PoolGeom& g, PoolScratch<T>& sc,
                      const T* gid, const T* xid, T wid) {
  const int64_t wp = g.w + 2, s = g.s, wo = g.wo;
  std::fill(sc.gxpad.begin(), sc.gxpad.end(), T(0));
  for (int t = 0; t < 9; ++t) {
    const int64_t di = t / 3, dj = t % 3;
    const T tc = T(t);
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      T* gr = sc.gxpad.data() + (oh * s + di) * wp + dj;
      const T* cd = code + oh * wo;
      const T* gm = gmax + oh * wo;
      const T* ga = gavg + oh * wo;
      if (s == 1) {
#pragma omp simd
        for (int64_t ow = 0; ow < wo; ++ow) {
          const T m = gm[ow];  // loaded unconditionally: a blend, not a branch, on AVX2
          gr[ow] += (cd[ow] == tc ? m : T(0)) + ga[ow];
        }
      } else {
        for (int64_t ow = 0; ow < wo; ++ow) gr[2 * ow] += (cd[ow] == tc ? gm[ow] : T(0)) + ga[ow];
      }
    }
  }
  T dot = 0;
  for (int64_t i = 0; i < g.h; ++i) {
    const T* src = sc.gxpad.data() + (i + 1) * wp + 1;
    T* dst = gx + i * g.w;
    if (gid) {  // stride 1: the identity's gradient and weight-gradient sum ride along
      const T* gi = gid + i * g.w;
      const T* xi = xid + i * g.w;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < g.w; ++j) {
        dst[j] = src[j] + wid * gi[j];
        dot += gi[j] * xi[j];
      }
    } else {
      std::copy_n(src, g.w, dst);
    }
  }
  return dot;
}

// dst[i] = w * g[i] (the gradient of a branch weighted by w); returns sum g[i] * src[i] (its weight's gradient).
template <typename T>
T scale_and_dot(const T* g, const T* src, T* dst, T w, int64_t n) {
  T a = 0;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < n; ++i) {
    a += g[i] * src[i];
    dst[i] = w * g[i];
  }
  return a;
}

struct CombineShape {
  int64_t n, c, h, w, ho, wo;
};

// Plane b of one pooled quantity of the channel at hand, in a per-thread buffer (N, Ho, Wo).
template <typename T>
struct PlaneRef {
  T* base;
  int64_t b_stride;
  T* at(int64_t b) const { return base + b * b_stride; }
};

template <typename T>
std::vector<const T*> branch_ptrs(const std::vector<at::Tensor>& branches) {
  std::vector<const T*> ptrs(kNumOps, nullptr);
  for (int k = 0; k < kNumOps; ++k)
    if (branches[k].defined()) ptrs[k] = branches[k].const_data_ptr<T>();
  return ptrs;
}

template <typename T>
void combine_forward_kernel(const at::Tensor& x, const std::vector<double>& wv,
                            const std::vector<at::Tensor>& branches, double* stats, int64_t active,
                            int64_t s, bool training, double eps, at::Tensor& out) {
  const CombineShape sh{x.size(0), x.size(1), x.size(2), x.size(3), out.size(2), out.size(3)};
  const int64_t hw = sh.h * sh.w, ohw = sh.ho * sh.wo, m = sh.n * ohw;
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  const bool ident = s == 1 && op_active(active, kSkip);
  const PoolGeom geom(sh.h, sh.w, s);
  const T* xd = x.const_data_ptr<T>();
  T* od = out.mutable_data_ptr<T>();
  const auto bp = branch_ptrs<T>(branches);
  at::parallel_for(0, sh.c, grain(sh.n * hw * 4), [&](int64_t begin, int64_t end) {
    PoolScratch<T> sc(geom);
    std::vector<T> own(pools ? 3 * m : 0);
    const PlaneRef<T> mx{own.data(), ohw}, avg{own.data() + m, ohw}, code{own.data() + 2 * m, ohw};
    const PlaneRef<T> pooled[2] = {mx, avg};
    for (int64_t ch = begin; ch < end; ++ch) {
      // (scale, shift) turning a pooled value into w_k * BN(pooled)
      T am = 0, bm = 0, aa = 0, ba = 0;
      if (pools) {
        for (int64_t b = 0; b < sh.n; ++b)
          pool_plane(xd + (b * sh.c + ch) * hw, geom, sc, mx.at(b), avg.at(b), code.at(b));
        double mean[2], var[2];
        if (training) {
          for (int q = 0; q < 2; ++q)
            moments<T>([&](int64_t b) { return pooled[q].at(b); }, sh.n, ohw, mean[q], var[q]);
          stats[0 * sh.c + ch] = mean[0];
          stats[1 * sh.c + ch] = var[0];
          stats[2 * sh.c + ch] = mean[1];
          stats[3 * sh.c + ch] = var[1];
        } else {
          mean[0] = stats[0 * sh.c + ch];
          var[0] = stats[1 * sh.c + ch];
          mean[1] = stats[2 * sh.c + ch];
          var[1] = stats[3 * sh.c + ch];
        }
        const double wm = op_active(active, kMaxPool) ? wv[kMaxPool] : 0.0;
        const double wa = op_active(active, kAvgPool) ? wv[kAvgPool] : 0.0;
        const double im = 1.0 / std::sqrt(var[0] + eps), ia = 1.0 / std::sqrt(var[1] + eps);
        am = T(wm * im);
        bm = T(-wm * im * mean[0]);
        aa = T(wa * ia);
        ba = T(-wa * ia * mean[1]);
      }
      const T c0 = bm + ba;
      for (int64_t b = 0; b < sh.n; ++b) {
        const int64_t plane = b * sh.c + ch;
        T* o = od + plane * ohw;
        if (pools) {
          const T* pm = mx.at(b);
          const T* pa = avg.at(b);
#pragma omp simd
          for (int64_t i = 0; i < ohw; ++i) o[i] = c0 + (am * pm[i] + aa * pa[i]);
        } else {
          std::fill(o, o + ohw, T(0));
        }
        if (ident) {
          const T w3 = T(wv[kSkip]);
          const T* xs = xd + plane * hw;
#pragma omp simd
          for (int64_t i = 0; i < ohw; ++i) o[i] += w3 * xs[i];
        }
        for (int k = kSkip; k < kNumOps; ++k) {
          if (!bp[k]) continue;
          const T wk = T(wv[k]);
          const T* src = bp[k] + plane * ohw;
#pragma omp simd
          for (int64_t i = 0; i < ohw; ++i) o[i] += wk * src[i];
        }
      }
    }
  });
}

template <typename T>
void combine_backward_kernel(const at::Tensor& g, const at::Tensor& x, const std::vector<double>& wv,
                             const std::vector<at::Tensor>& branches, const double* stats,
                             int64_t active, int64_t s, bool training, double eps, at::Tensor& gx,
                             std::vector<at::Tensor>& gb, std::vector<double>& gw_ch) {
  const CombineShape sh{x.size(0), x.size(1), x.size(2), x.size(3), g.size(2), g.size(3)};
  const int64_t hw = sh.h * sh.w, ohw = sh.ho * sh.wo, m = sh.n * ohw;
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  const bool ident = s == 1 && op_active(active, kSkip);
  const PoolGeom geom(sh.h, sh.w, s);
  const T* gd = g.const_data_ptr<T>();
  const T* xd = x.const_data_ptr<T>();
  T* gxd = gx.mutable_data_ptr<T>();
  const auto bp = branch_ptrs<T>(branches);
  std::vector<T*> gbp(kNumOps, nullptr);
  for (int k = 0; k < kNumOps; ++k)
    if (gb[k].defined()) gbp[k] = gb[k].mutable_data_ptr<T>();
  at::parallel_for(0, sh.c, grain(sh.n * hw * 4), [&](int64_t begin, int64_t end) {
    PoolScratch<T> sc(geom);
    std::vector<T> own(pools ? 3 * m : 0);  // the channel's pooled planes and codes, recomputed in pass 1
    const PlaneRef<T> mx{own.data(), ohw}, avg{own.data() + m, ohw}, code{own.data() + 2 * m, ohw};
    T* gpm = sc.gpm.data();
    T* gpa = sc.gpa.data();
    for (int64_t ch = begin; ch < end; ++ch) {
      double* gwc = gw_ch.data() + ch * kNumOps;
      // Pass 1: the pools again, and per-channel sums of grad_out against them (for the BatchNorm backward).
      double sg = 0, sgm = 0, sga = 0;
      for (int64_t b = 0; b < sh.n && pools; ++b) {
        const T* gs = gd + (b * sh.c + ch) * ohw;
        const T* pm = mx.at(b);
        const T* pa = avg.at(b);
        pool_plane(xd + (b * sh.c + ch) * hw, geom, sc, mx.at(b), avg.at(b), code.at(b));
        T a0 = 0, a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a0, a1, a2)
        for (int64_t i = 0; i < ohw; ++i) {
          a0 += gs[i];
          a1 += gs[i] * pm[i];
          a2 += gs[i] * pa[i];
        }
        sg += a0;
        sgm += a1;
        sga += a2;
      }
      // grad wrt pooled value = A * g + B * pooled + D (BatchNorm backward folded into three scalars);
      // all zero for an inactive pool.
      T amx = 0, bmx = 0, dmx = 0, aav = 0, bav = 0, dav = 0;
      if (pools) {
        const double mean[2] = {stats[0 * sh.c + ch], stats[2 * sh.c + ch]};
        const double var[2] = {stats[1 * sh.c + ch], stats[3 * sh.c + ch]};
        const double sgp[2] = {sgm, sga};
        const int ks[2] = {kMaxPool, kAvgPool};
        T* coef[2][3] = {{&amx, &bmx, &dmx}, {&aav, &bav, &dav}};
        for (int q = 0; q < 2; ++q) {
          const double inv = 1.0 / std::sqrt(var[q] + eps);
          const double sgx = inv * (sgp[q] - mean[q] * sg);  // sum g * xhat
          gwc[ks[q]] = sgx;
          if (!op_active(active, ks[q])) continue;
          const double wk = wv[ks[q]];
          double a = wk * inv, bb = 0, d = 0;
          if (training) {
            bb = -wk * inv * inv * sgx / m;
            d = -wk * inv * sg / m - bb * mean[q];
          }
          *coef[q][0] = T(a);
          *coef[q][1] = T(bb);
          *coef[q][2] = T(d);
        }
      }
      // Pass 2: grad_x (pools and identity, each plane written once) while g, the pooled planes and x are
      // still in the CPU cache from pass 1.
      const T w3 = ident ? T(wv[kSkip]) : T(0);
      for (int64_t b = 0; b < sh.n; ++b) {
        const int64_t plane = b * sh.c + ch;
        const T* gs = gd + plane * ohw;
        const T* xs = xd + plane * hw;
        T* gxs = gxd + plane * hw;
        if (pools) {
          const T* pm = mx.at(b);
          const T* pa = avg.at(b);
          const T* ic = sc.icnt.data();
#pragma omp simd
          for (int64_t i = 0; i < ohw; ++i) {
            gpm[i] = amx * gs[i] + bmx * pm[i] + dmx;
            gpa[i] = (aav * gs[i] + bav * pa[i] + dav) * ic[i];  // spread over the valid window
          }
          gwc[kSkip] += pool_backward_plane(code.at(b), gpm, gpa, gxs, geom, sc, ident ? gs : nullptr, xs, w3);
        } else if (ident) {
          gwc[kSkip] += scale_and_dot(gs, xs, gxs, w3, ohw);
        } else {
          std::fill(gxs, gxs + hw, T(0));
        }
      }
      // Pass 3: the external branches' gradients (w_k * g) and weight-gradient sums.
      for (int64_t b = 0; b < sh.n; ++b) {
        const int64_t plane = b * sh.c + ch;
        const T* gs = gd + plane * ohw;
        for (int k = kSkip; k < kNumOps; ++k) {
          if (!bp[k]) continue;
          gwc[k] += scale_and_dot(gs, bp[k] + plane * ohw, gbp[k] + plane * ohw, T(wv[k]), ohw);
        }
      }
    }
  });
}

std::vector<at::Tensor> contiguous_branches(std::vector<at::Tensor> slots) {
  for (auto& b : slots)
    if (b.defined()) b = b.contiguous();
  return slots;
}

std::vector<double> weight_values(const at::Tensor& weights) {
  const at::Tensor w = weights.detach().to(at::kDouble).contiguous();
  const double* p = w.const_data_ptr<double>();
  return std::vector<double>(p, p + kNumOps);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Operator entry points

at::Tensor dwconv_cpu(const at::Tensor& x_, const at::Tensor& weight_, int64_t stride, int64_t dilation,
                      bool relu_input) {
  check_dwconv(x_, weight_, stride, dilation);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  at::Tensor out =
      at::empty({x.size(0), x.size(1), out_size(x.size(2), stride), out_size(x.size(3), stride)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_cpu",
                             [&] { dwconv_forward_kernel<scalar_t>(x, weight, out, stride, dilation, relu_input); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                       const at::Tensor& weight_, int64_t stride,
                                                       int64_t dilation, bool relu_input) {
  check_dwconv(x_, weight_, stride, dilation);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), g = grad_out.contiguous();
  TORCH_CHECK(g.dim() == 4 && g.size(0) == x.size(0) && g.size(1) == x.size(1) &&
                  g.size(2) == out_size(x.size(2), stride) && g.size(3) == out_size(x.size(3), stride),
              "hwnas.dwconv_backward: grad_out has shape ", g.sizes(), " which does not match x ", x.sizes());
  at::Tensor gx = at::empty_like(x);
  const int64_t k = weight.size(2);
  at::Tensor gw_planes = at::empty({x.size(0), x.size(1), k * k}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_dwconv_backward_cpu", [&] {
    dwconv_backward_kernel<scalar_t>(g, x, weight, gx, gw_planes, stride, dilation, relu_input);
  });
  at::Tensor gw = gw_planes.sum(0).view(weight.sizes());  // reduce the per-plane partials over the batch
  return {gx, gw};
}

std::tuple<at::Tensor, at::Tensor> combine_cpu(const at::Tensor& x_, const at::Tensor& weights,
                                               at::TensorList branches_, const std::optional<at::Tensor>& running_stats,
                                               int64_t active, int64_t stride, bool training, double eps) {
  const auto branches = contiguous_branches(check_combine(x_, weights, branches_, active, stride));
  const at::Tensor x = x_.contiguous();
  const auto wv = weight_values(weights);
  const int64_t c = x.size(1);
  at::Tensor out =
      at::empty({x.size(0), c, out_size(x.size(2), stride), out_size(x.size(3), stride)}, x.options());
  const bool pools = op_active(active, kMaxPool) || op_active(active, kAvgPool);
  at::Tensor stats64;
  if (training || !pools) {
    stats64 = at::zeros({4, c}, x.options().dtype(at::kDouble));
  } else {
    TORCH_CHECK(running_stats.has_value() && running_stats->defined() && running_stats->dim() == 2 &&
                    running_stats->size(0) == 4 && running_stats->size(1) == c,
                "hwnas.combine: eval mode needs running_stats of shape (4, ", c, ")");
    stats64 = running_stats->to(at::kDouble).contiguous().clone();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_combine_cpu", [&] {
    combine_forward_kernel<scalar_t>(x, wv, branches, stats64.mutable_data_ptr<double>(), active, stride, training,
                                     eps, out);
  });
  return {out, stats64.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> combine_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weights, at::TensorList branches_,
    const at::Tensor& stats, int64_t active, int64_t stride, bool training, double eps) {
  const auto branches = contiguous_branches(check_combine(x_, weights, branches_, active, stride));
  const at::Tensor x = x_.contiguous(), g = grad_out.contiguous();
  const int64_t c = x.size(1);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == x.size(0) && g.size(1) == c && g.size(2) == out_size(x.size(2), stride) &&
                  g.size(3) == out_size(x.size(3), stride),
              "hwnas.combine_backward: grad_out has shape ", g.sizes(), " which does not match x ", x.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == c,
              "hwnas.combine_backward: stats must be (4, ", c, ")");
  const auto wv = weight_values(weights);
  const at::Tensor stats64 = stats.to(at::kDouble).contiguous();
  at::Tensor gx = at::empty_like(x);
  std::vector<at::Tensor> gb(kNumOps);
  for (int k = 0; k < kNumOps; ++k)
    if (branches[k].defined()) gb[k] = at::empty_like(g);
  std::vector<double> gw_ch(c * kNumOps, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hwnas_combine_backward_cpu", [&] {
    combine_backward_kernel<scalar_t>(g, x, wv, branches, stats64.const_data_ptr<double>(), active, stride,
                                      training, eps, gx, gb, gw_ch);
  });
  at::Tensor gw64 = at::zeros({kNumOps}, x.options().dtype(at::kDouble));
  double* gwp = gw64.mutable_data_ptr<double>();
  for (int64_t ch = 0; ch < c; ++ch)
    for (int k = 1; k < kNumOps; ++k)
      if (op_active(active, k)) gwp[k] += gw_ch[ch * kNumOps + k];
  std::vector<at::Tensor> grad_branches;
  for (int k = 0; k < kNumOps; ++k)
    if (gb[k].defined()) grad_branches.push_back(gb[k]);
  return {gx, gw64.to(weights.scalar_type()), grad_branches};
}

}  // namespace hwnas

TORCH_LIBRARY_IMPL(hwnas, CPU, m) {
  m.impl("dwconv", &hwnas::dwconv_cpu);
  m.impl("dwconv_backward", &hwnas::dwconv_backward_cpu);
  m.impl("combine", &hwnas::combine_cpu);
  m.impl("combine_backward", &hwnas::combine_backward_cpu);
}
