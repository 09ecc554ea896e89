// Shared declarations of the hwnas:: MixedOp operators (CPU and CUDA implement the same semantics).
//
// dwconv            depthwise k x k convolution (k = weight.size(-1), odd), padding d*(k-1)/2 so the
//                   output is ceil(H/stride) x ceil(W/stride); optional ReLU applied to the input on read.
// dwconv_backward   (grad_input, grad_weight) of dwconv.
// combine           the fused MixedOp sum: parameter-free branches computed from x (3x3 max pool + BN,
//                   3x3 avg pool (count_include_pad=False) + BN, identity at stride 1) plus the weighted
//                   externally computed branches; returns (out, stats) where stats (4, C) holds the batch
//                   mean and biased variance of the max- and avg-pool outputs (training) or a copy of the
//                   running statistics it used (eval).
// combine_backward  (grad_x, grad_weights (8,), grad of each present branch in op order), given the forward's
//                   stats; it recomputes the pools from x (cheaper than keeping them: the op is bound by
//                   memory traffic).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace hwnas {

// Op indices in PRIMITIVES order (hwnas/space/ops.py).
constexpr int kNumOps = 8;
constexpr int kMaxPool = 1;
constexpr int kAvgPool = 2;
constexpr int kSkip = 3;

// constexpr: callable from CUDA device code too (--expt-relaxed-constexpr).
constexpr bool op_active(int64_t mask, int k) { return (mask >> k) & 1; }
inline int64_t out_size(int64_t in, int64_t stride) { return (in + stride - 1) / stride; }

// Argument checks shared by every device (defined in bindings.cpp); they throw with a clear message.
void check_dwconv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation);
// Checks the combine arguments and returns the branch outputs in op slots (undefined where the op is
// inactive or computed inside the kernel). `branches` holds the external branches of the active ops in op
// order: skip_connect (FactorizedReduce) at stride 2, then the active conv ops 4..7.
std::vector<at::Tensor> check_combine(const at::Tensor& x, const at::Tensor& weights, at::TensorList branches,
                                      int64_t active, int64_t stride);
inline bool is_external(int k, int64_t stride) { return k > kSkip || (k == kSkip && stride == 2); }
// t (named `name` in errors of op `op`) has x's device and dtype.
void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name);
// stats (running_stats or the saved statistics) is a floating (4, C) tensor on x's device.
void check_stats(const at::Tensor& stats, const at::Tensor& x, const char* op, const char* name);

// CPU
at::Tensor dwconv_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation,
                      bool relu_input);
std::tuple<at::Tensor, at::Tensor> dwconv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& weight, int64_t stride,
                                                       int64_t dilation, bool relu_input);
std::tuple<at::Tensor, at::Tensor> combine_cpu(const at::Tensor& x, const at::Tensor& weights,
                                               at::TensorList branches, const std::optional<at::Tensor>& running_stats,
                                               int64_t active, int64_t stride, bool training, double eps);
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> combine_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weights, at::TensorList branches,
    const at::Tensor& stats, int64_t active, int64_t stride, bool training, double eps);

}  // namespace hwnas
