#!/usr/bin/env bash
# The GPU suite, in one call on a machine with an NVIDIA GPU:
#   benchmarks/gpu_suite.sh OUT_DIR
# 1. builds vtprune._C for this GPU's architecture (no network needed: --no-build-isolation,
#    so setuptools, wheel and pybind11 must already be installed, as torch is);
# 2. runs the whole test suite with the GPU tests on;
# 3. runs compute-sanitizer (memcheck, racecheck, synccheck) over benchmarks/sanitizer_driver.py;
# 4. runs the benchmark table;
# and writes logs, JSON and a markdown summary (device, driver, versions, date) to OUT_DIR.
# Exit status: non-zero if any step failed; every step runs regardless.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0
step() {  # step NAME CMD...: run, log to OUT/NAME.log, record the result
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '| %s | %s | %ss |\n' "$name" "$([ $rc -eq 0 ] && echo pass || echo "FAIL (rc $rc)")" "$(( $(date +%s) - t0 ))" >> "$out/steps.md"
  [ $rc -eq 0 ] || status=1
  echo "gpu_suite: $name rc=$rc"
}

arch=$($py -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')") || { echo "gpu_suite: no GPU"; exit 2; }
: > "$out/steps.md"
step build env VTPRUNE_BUILD_CUDA=1 VTPRUNE_CUDA_ARCHS="$arch" $py -m pip install --no-build-isolation --no-deps -e . -v
step info $py -m vtprune info
step tests $py -m pytest -q tests
for tool in memcheck racecheck synccheck; do
  step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 $py benchmarks/sanitizer_driver.py
done
step bench-scope $py benchmarks/run.py --out "$out"

{
  echo "# vtprune GPU suite"
  echo
  echo "- date: $(date -u +%Y-%m-%d)"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- $($py -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")')"
  echo "- triton $($py -c 'import triton; print(triton.__version__)' 2>/dev/null || echo 'not installed'), nvcc $(nvcc --version | grep -o 'release [0-9.]*')"
  echo "- built for sm_$arch"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  cat "$out/steps.md"
  echo
  echo "Test summary: $(tail -n 1 "$out/tests.log")"
  echo
  [ -f "$out/scope.md" ] && sed 1d "$out/scope.md"
} > "$out/summary.md"
echo "gpu_suite: wrote $out/summary.md"
exit $status
