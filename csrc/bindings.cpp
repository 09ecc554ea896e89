// Python module hwnas._C: importing it registers the hwnas:: operators (TORCH_LIBRARY in the
// per-device sources). Only build facts are exposed to Python directly.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "hwnas compiled MixedOp kernels";
#ifdef HWNAS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
