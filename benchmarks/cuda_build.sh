#!/usr/bin/env bash
# CUDA build check (no GPU needed): builds hwnas._C against the CUDA build of torch with -Werror on our
# sources and proves the CUDA kernels are registered. Run it in every session that touches csrc/.
#
#   bash benchmarks/cuda_build.sh          # exit 0 and "RESULT: PASS" when every check passed
#
# The virtual environment (build/cuda-venv, ~6 GB: torch with its CUDA libraries) is created once and
# reused; the main environment is never touched (a CUDA torch must not replace its CPU one). The built
# module goes to build/cuda/stage/hwnas (a copy of the package), never into hwnas/.
# Environment: HWNAS_CUDA_VENV (venv path), HWNAS_CUDA_TORCH (pip spec, default torch==2.14.1),
# HWNAS_CUDA_ARCHS (default "80;90"), PYTHON (interpreter that creates the venv), CUDACXX (nvcc).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${HWNAS_CUDA_VENV:-build/cuda-venv}")
TORCH_SPEC=${HWNAS_CUDA_TORCH:-torch==2.14.1}
ARCHS=${HWNAS_CUDA_ARCHS:-80;90}
BUILD=build/cuda
STAGE=$BUILD/stage
PY=$VENV/bin/python
FAILED=()
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILED+=("$*"); }
summary() {
  echo "================ cuda_build summary ================"
  if [ ${#FAILED[@]} -eq 0 ]; then echo "RESULT: PASS"; exit 0; fi
  for f in "${FAILED[@]}"; do echo "  failed: $f"; done
  echo "RESULT: FAIL"
  exit 1
}

# 1. nvcc
if [ -z "${CUDACXX:-}" ]; then
  if command -v nvcc >/dev/null; then CUDACXX=$(command -v nvcc); else CUDACXX=/usr/local/cuda/bin/nvcc; fi
fi
export CUDACXX
if [ -x "$CUDACXX" ]; then pass "nvcc found: $CUDACXX ($("$CUDACXX" --version | grep -o 'release [0-9.]*'))"
else fail "no nvcc at $CUDACXX (set CUDACXX)"; summary; fi

# 2. virtual environment with the CUDA torch and the build tools
if [ ! -x "$PY" ]; then
  "${PYTHON:-python3}" -m venv "$VENV" || { fail "cannot create venv $VENV"; summary; }
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "installing $TORCH_SPEC into $VENV (several GB, once) ..."
  "$PY" -m pip install -q "$TORCH_SPEC" || { fail "pip install $TORCH_SPEC"; summary; }
fi
# Build tools, plus what `import hwnas.kernels` and `hwnas info` import.
"$PY" -m pip install -q numpy "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.30" ninja onnx onnxruntime \
  || { fail "pip install build tools"; summary; }
TORCH_INFO=$("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")
if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then pass "venv torch $TORCH_INFO"
else fail "venv torch has no CUDA ($TORCH_INFO)"; summary; fi

# 3. configure and build with CUDA, -Werror on csrc/
CMAKE=$VENV/bin/cmake
start=$(date +%s)
if "$CMAKE" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DPython_EXECUTABLE="$PY" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DHWNAS_WERROR=ON -DHWNAS_CUDA_ARCHS="$ARCHS" \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" > "$BUILD.configure.log" 2>&1 \
  && grep -q "hwnas: CUDA kernels ON" "$BUILD.configure.log"; then
  pass "configure ($("$CMAKE" --version | head -1), CUDA kernels ON, archs $ARCHS, -Werror)"
else
  tail -30 "$BUILD.configure.log"; fail "configure (log: $BUILD.configure.log)"; summary
fi
if "$CMAKE" --build "$BUILD" 2>&1 | tee "$BUILD.build.log" | grep -E "warning|error" ; then :; fi
if [ "${PIPESTATUS[0]}" -ne 0 ] || ! ls "$BUILD"/_C*.so >/dev/null 2>&1; then
  tail -40 "$BUILD.build.log"; fail "build (log: $BUILD.build.log)"; summary
fi
pass "build in $(( $(date +%s) - start )) s with -Werror ($(nproc) cores)"
SO=$(ls "$BUILD"/_C*.so)
# (no cuobjdump in a bare nvcc install: check the nvcc command line that built the kernels)
# captured first: `ninja | grep -q` under pipefail fails at random when grep exits before ninja has written all
COMMANDS=$("$VENV/bin/ninja" -C "$BUILD" -t commands)
for arch in ${ARCHS//;/ }; do
  if grep -q "code=\[compute_$arch,sm_$arch\]" <<<"$COMMANDS"; then
    pass "mixed_op.cu compiled for sm_$arch"
  else fail "mixed_op.cu not compiled for sm_$arch"; fi
done

# 4. stage a copy of the package with the CUDA module and check the registrations
rm -rf "$STAGE" && mkdir -p "$STAGE" && cp -r hwnas "$STAGE/" && rm -f "$STAGE"/hwnas/_C*.so && cp "$SO" "$STAGE/hwnas/"
if PYTHONPATH="$PWD/$STAGE" "$PY" -P - <<'EOF'
import sys
import torch
import hwnas
from hwnas import _C
assert hwnas.__file__.startswith(sys.path[0]) or "stage" in hwnas.__file__, hwnas.__file__
assert _C.with_cuda, "hwnas._C.with_cuda is False"
ok = True
for op in ("dwconv", "dwconv_backward", "combine", "combine_backward"):
    for key in ("CUDA", "CPU"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"hwnas::{op}", key)
        print(f"  hwnas::{op:<17} {key:<4} kernel: {has}")
        ok &= has
sys.exit(0 if ok else 1)
EOF
then pass "torch.ops.hwnas.{dwconv,dwconv_backward,combine,combine_backward} have CUDA and CPU kernels"
else fail "CUDA kernels not registered"; fi

INFO=$(cd "$STAGE" && "$PY" -m hwnas.cli info 2>&1)
echo "$INFO" | sed -n '/"extension"/,/}/p'
if echo "$INFO" | "$PY" -c "import json,sys; e=json.load(sys.stdin)['extension']; sys.exit(0 if e['built'] and e['with_cuda'] else 1)" 2>/dev/null
then pass "hwnas info: extension built with CUDA"
else echo "$INFO" | tail -20; fail "hwnas info does not list the CUDA extension"; fi
summary
