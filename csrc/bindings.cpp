// Python module hwnas._C: importing it registers the hwnas:: operator schemas below; the per-device
// sources register the implementations. Also home of the argument checks every device shares.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "mixed_op.h"

namespace hwnas {
namespace {

// Parameters may stay float32 when x is half or bfloat16 (autocast); otherwise they have x's dtype.
bool param_dtype_ok(at::ScalarType param, at::ScalarType x) {
  return param == x || (param == at::kFloat && (x == at::kHalf || x == at::kBFloat16));
}

}  // namespace

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "hwnas.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "hwnas.", op, ": ", name, " is ", t.scalar_type(), " but x is ",
              x.scalar_type());
}

void check_stats(const at::Tensor& stats, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == x.size(1), "hwnas.", op, ": ", name,
              " must be (4, ", x.size(1), "), got ", stats.sizes());
  TORCH_CHECK(stats.device() == x.device(), "hwnas.", op, ": ", name, " is on ", stats.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(stats.scalar_type()), "hwnas.", op, ": ", name, " must be floating, got ",
              stats.scalar_type());
}

void check_dwconv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation) {
  TORCH_CHECK(x.dim() == 4, "hwnas.dwconv: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "hwnas.dwconv: weight must be (C, 1, k, k) with odd k and C = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "hwnas.dwconv: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(dilation >= 1, "hwnas.dwconv: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(param_dtype_ok(weight.scalar_type(), x.scalar_type()), "hwnas.dwconv: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "hwnas.dwconv: weight is on ", weight.device(), " but x is on ",
              x.device());
}

std::vector<at::Tensor> check_combine(const at::Tensor& x, const at::Tensor& weights, at::TensorList branches,
                                      int64_t active, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "hwnas.combine: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "hwnas.combine: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == kNumOps, "hwnas.combine: weights must be (",
              kNumOps, ",), got ", weights.sizes());
  TORCH_CHECK(param_dtype_ok(weights.scalar_type(), x.scalar_type()), "hwnas.combine: weights are ",
              weights.scalar_type(), " but x is ", x.scalar_type());
  TORCH_CHECK(weights.device() == x.device(), "hwnas.combine: weights are on ", weights.device(), " but x is on ",
              x.device());
  TORCH_CHECK(active >= 0 && active < (1 << kNumOps) && !op_active(active, 0),
              "hwnas.combine: active must be a bit mask over ops 1..7, got ", active);
  const int64_t ho = out_size(x.size(2), stride), wo = out_size(x.size(3), stride);
  std::vector<at::Tensor> slots(kNumOps);
  size_t next = 0;
  for (int k = 0; k < kNumOps; ++k) {
    if (!op_active(active, k) || !is_external(k, stride)) continue;
    TORCH_CHECK(next < branches.size(), "hwnas.combine: active op ", k, " needs its branch output; got only ",
                branches.size(), " branches");
    const at::Tensor& b = branches[next++];
    TORCH_CHECK(b.dim() == 4 && b.size(0) == x.size(0) && b.size(1) == x.size(1) && b.size(2) == ho &&
                    b.size(3) == wo,
                "hwnas.combine: branch of op ", k, " must be (", x.size(0), ", ", x.size(1), ", ", ho, ", ", wo,
                "), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.device() == x.device(), "hwnas.combine: branch of op ",
                k, " has another dtype or device than x");
    slots[k] = b;
  }
  TORCH_CHECK(next == branches.size(), "hwnas.combine: got ", branches.size(), " branches but the active mask ",
              active, " at stride ", stride, " needs ", next);
  return slots;
}

}  // namespace hwnas

TORCH_LIBRARY(hwnas, m) {
  // Fake (meta) kernels and autograd live in Python; tell torch where to find them.
  m.set_python_module("hwnas.kernels.compiled");
  m.def("dwconv(Tensor x, Tensor weight, int stride, int dilation, bool relu_input) -> Tensor");
  m.def(
      "dwconv_backward(Tensor grad_out, Tensor x, Tensor weight, int stride, int dilation, bool relu_input)"
      " -> (Tensor, Tensor)");
  m.def(
      "combine(Tensor x, Tensor weights, Tensor[] branches, Tensor? running_stats, int active, int stride,"
      " bool training, float eps) -> (Tensor, Tensor)");
  m.def(
      "combine_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor[] branches, Tensor stats,"
      " int active, int stride, bool training, float eps) -> (Tensor, Tensor, Tensor[])");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hwnas compiled MixedOp kernels (operators live in torch.ops.hwnas)";
#ifdef HWNAS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
