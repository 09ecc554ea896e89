// CPU (OpenMP) implementations of the hwnas:: MixedOp operators.
#include <torch/library.h>

TORCH_LIBRARY(hwnas, m) {}
