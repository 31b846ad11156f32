#!/usr/bin/env bash
# The GPU suite, in one call on a machine with an NVIDIA GPU:
#   benchmarks/gpu_suite.sh OUT_DIR
# 1. builds vtprune._C for this GPU's architecture (no network needed: --no-build-isolation,
#    so setuptools, wheel and pybind11 must already be installed, as torch is);
# 2. runs the whole test suite with the GPU tests on;
# 3. runs compute-sanitizer (memcheck, racecheck, synccheck) over benchmarks/sanitizer_driver.py;
# 4. runs the benchmark tables of SCOPE, HoloV and attention importance (benchmarks/run.py,
#    i.e. `vtprune bench`), each to OUT_DIR/<op>.json and <op>.md, and, when matplotlib is
#    installed, OUT_DIR/<op>.png (latency vs N / k / L per provider);
# and writes logs and a markdown summary (device, driver, versions, date, every table) to OUT_DIR.
# Nothing is downloaded: the build uses the installed setuptools/pybind11/cmake.
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
if $py -c "import matplotlib" 2>/dev/null; then plots=1; else
  plots=0; echo "gpu_suite: matplotlib is not installed: the tables run, the PNG plots are skipped"
fi
for op in scope holov attention; do
  rm -f "$out/$op.json" "$out/$op.md" "$out/$op.png"  # no stale table from an earlier run
  plot_args=()
  [ $plots -eq 1 ] && plot_args=(--plot "$out/$op.png")
  # the ${a[@]+...} form: an empty array is an unbound variable under `set -u` before bash 4.4
  step "bench-$op" $py benchmarks/run.py --op "$op" --out "$out" ${plot_args[@]+"${plot_args[@]}"}
done

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
  for op in scope holov attention; do
    if [ -f "$out/$op.md" ]; then
      echo "## $op"
      echo
      echo "Files: $op.json, $op.md$([ -f "$out/$op.png" ] && echo ", $op.png (latency plot)"); log: bench-$op.log"
      sed 1d "$out/$op.md"
      [ -f "$out/$op.png" ] && printf '\n![%s latency](%s.png)\n' "$op" "$op"
      echo
    else
      echo "## $op: no table (see bench-$op.log)"
      echo
    fi
  done
  [ $plots -eq 1 ] || echo "No plots: matplotlib is not installed on this machine."
} > "$out/summary.md"
echo "gpu_suite: wrote $out/summary.md"
exit $status
