#!/usr/bin/env bash
# The GPU session's one prepared check (about 8 minutes on an H200): build hwnas._C with CUDA (-Werror),
# run the CUDA tests, run benchmarks/kernel.py --device cuda. Results go to benchmarks/results/
# (gpu_tests.xml, gpu_check.json, kernel_cuda.json) and, when $OUT is set (the device tool), to $OUT too.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU, torch with CUDA, nvcc, CMake, pybind11
#
# Missing Python packages (pytest, numpy, ...) are installed from .whl/ when it holds their wheels:
# the device machine reaches no package index. Environment: HWNAS_CUDA_ARCHS (default 90: the GPU at
# hand), KERNEL_ROUNDS (default 5), COMPILE_TIMEOUT (torch.compile seconds in kernel.py, default 60).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${HWNAS_CUDA_ARCHS:-90}
RESULTS=benchmarks/results
BUILD=build/gpu
mkdir -p "$RESULTS" "$BUILD"
declare -A STATUS
t0=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
record() { STATUS[$1]=$2; echo "$2: $1"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
for mod in pytest numpy tqdm; do
  if ! "$PY" -c "import $mod" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl "$mod" || echo "could not install $mod from .whl/"
  fi
done

step "build (archs $ARCHS)"
NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
bstart=$(date +%s)
if timeout 300 cmake -S . -B "$BUILD" "${GEN[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
     -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DHWNAS_WERROR=ON -DHWNAS_CUDA_ARCHS="$ARCHS" \
     -DCMAKE_CUDA_COMPILER="$NVCC" > "$BUILD/configure.log" 2>&1 \
   && grep -q "hwnas: CUDA kernels ON" "$BUILD/configure.log" \
   && timeout 300 cmake --build "$BUILD" -j "$(nproc)" > "$BUILD/build.log" 2>&1; then
  cp "$BUILD"/_C*.so hwnas/
  record build PASS
else
  tail -30 "$BUILD/configure.log" "$BUILD/build.log" 2>/dev/null
  record build FAIL
fi
BUILD_S=$(( $(date +%s) - bstart ))

step "CUDA tests"
if [ "${STATUS[build]}" = PASS ]; then
  # test_kernels.py holds device-parametrised tests too; its "cuda" cases run here.
  if timeout 240 "$PY" -m pytest -q tests/test_kernels_cuda.py tests/test_kernels.py -k cuda \
       --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tail -25; then record tests PASS
  else record tests FAIL; fi
else record tests SKIPPED; fi

step "benchmarks/kernel.py --device cuda"
if [ "${STATUS[build]}" = PASS ]; then
  if timeout 300 "$PY" benchmarks/kernel.py --device cuda --rounds "${KERNEL_ROUNDS:-5}" \
       --compile-timeout "${COMPILE_TIMEOUT:-60}" --out "$RESULTS/kernel_cuda.json" > "$BUILD/kernel.log" 2>&1; then
    record kernel PASS
  else tail -20 "$BUILD/kernel.log"; record kernel FAIL; fi
  cat "$RESULTS/kernel_cuda.json" 2>/dev/null
else record kernel SKIPPED; fi

step "summary"
"$PY" - "$RESULTS/gpu_check.json" "$BUILD_S" "${STATUS[build]}" "${STATUS[tests]}" "${STATUS[kernel]}" <<'EOF'
import json, subprocess, sys
import torch
out, build_s, build, tests, kernel = sys.argv[1:]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
report = {"schema_version": 1, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
          "build": build, "build_seconds": int(build_s), "tests": tests, "kernel_benchmark": kernel}
open(out, "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/gpu_check.json "$RESULTS"/gpu_tests.xml "$RESULTS"/kernel_cuda.json "$BUILD"/*.log "$OUT"/ 2>/dev/null
fi
echo "total $(( $(date +%s) - t0 )) s"
for s in build tests kernel; do [ "${STATUS[$s]}" = PASS ] || { echo "RESULT: FAIL"; exit 1; }; done
echo "RESULT: PASS"
