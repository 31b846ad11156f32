#!/usr/bin/env bash
# The GPU suite, on a machine with an NVIDIA GPU:
#   benchmarks/gpu_suite.sh OUT_DIR [STEP ...]
# Steps, in this order when none is named (run all of them):
#   build      builds vtprune._C for this GPU's architecture (no network: --no-build-isolation, so
#              setuptools, wheel, cmake and pybind11 must already be installed, as torch is)
#   info       `vtprune info`
#   tests      the whole test suite with the GPU tests on (pytest-xdist spreads it over
#              $PYTEST_WORKERS workers, default the CPU count up to 16, when it is installed;
#              $PYTEST_ARGS adds options, e.g. PYTEST_ARGS='-k "not emu"' leaves out the CUDA
#              emulator's runs of the kernel tests, which CI already makes, when time is short)
#   sanitizer  compute-sanitizer memcheck (CUDA and Triton kernels), racecheck and synccheck (CUDA
#              kernels) over benchmarks/sanitizer_driver.py
#              (or one of them: sanitizer-memcheck, sanitizer-racecheck, sanitizer-synccheck)
#   bench      the SCOPE, HoloV and attention-importance tables (or one: bench-scope, bench-holov,
#              bench-attention), each to OUT_DIR/<op>.json and <op>.md, and OUT_DIR/<op>.png
#              (latency vs N / k / L per provider) when matplotlib is installed; and bench-host:
#              benchmarks/host_overhead.py --mode gpu (eager vs CUDA-graph time per call: the
#              host's share of each latency) to OUT_DIR/bench-host.log
#   summary    only rewrites OUT_DIR/summary.md from what OUT_DIR holds (always run last), with
#              the issue targets judged on the tables (python -m vtprune.bench.targets OUT_DIR)
# A session whose commands are time-limited runs the steps over several calls, e.g.
# `build info tests`, then `build sanitizer`, then `build bench` (build is incremental), and
# copies the OUT_DIRs into one folder; `gpu_suite.sh FOLDER summary` then writes one summary.
# Give such calls a STEP_TIMEOUT below the call limit (e.g. 420 under a 600 s limit), so a slow
# step still leaves its log, its steps.md line and the summary.
# Each step logs to OUT_DIR/<step>.log and its result line to OUT_DIR/steps.md. STEP_TIMEOUT
# (seconds, default none) stops a step that runs longer, so one slow step cannot use up a call.
# Exit status: non-zero if any step failed; every named step runs regardless.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [build|info|tests|sanitizer|bench|summary ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
step_timeout=${STEP_TIMEOUT:-0}
status=0

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build info tests sanitizer bench)
expanded=()
for s in "${steps[@]}"; do
  case $s in
    sanitizer) expanded+=(sanitizer-memcheck sanitizer-racecheck sanitizer-synccheck) ;;
    bench) expanded+=(bench-scope bench-holov bench-attention bench-host) ;;
    build|info|tests|summary|sanitizer-memcheck|sanitizer-racecheck|sanitizer-synccheck|bench-scope|bench-holov|bench-attention|bench-host)
      expanded+=("$s") ;;
    *) echo "gpu_suite: unknown step '$s'" >&2; exit 2 ;;
  esac
done

step() {  # step NAME CMD...: run, log to OUT/NAME.log, record the result (a re-run replaces it)
  local name=$1; shift
  local t0=$(date +%s) rc
  if [ "$step_timeout" -gt 0 ]; then
    # SIGINT first so pytest and the bench runner still print what they have.
    timeout --signal=INT --kill-after=30 "$step_timeout" "$@" > "$out/$name.log" 2>&1
  else
    "$@" > "$out/$name.log" 2>&1
  fi
  rc=$?
  touch "$out/steps.md"
  grep -v "^| $name |" "$out/steps.md" > "$out/steps.md.tmp"; mv "$out/steps.md.tmp" "$out/steps.md"
  local result=pass
  [ $rc -eq 0 ] || result="FAIL (rc $rc$([ $rc -eq 124 ] && echo ", timed out after ${step_timeout}s"))"
  printf '| %s | %s | %ss |\n' "$name" "$result" "$(( $(date +%s) - t0 ))" >> "$out/steps.md"
  [ $rc -eq 0 ] || status=1
  echo "gpu_suite: $name rc=$rc ($(( $(date +%s) - t0 ))s)"
}

write_env() {  # the machine this call ran on, for the summary
  {
    echo "- date: $(date -u +%Y-%m-%d)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
    echo "- $($py -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")')"
    echo "- triton $($py -c 'import triton; print(triton.__version__)' 2>/dev/null || echo 'not installed'), nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"
    echo "- built for sm_$arch"
  } > "$out/env.md"
}

write_summary() {
  {
    echo "# vtprune GPU suite"
    echo
    if [ -f "$out/env.md" ]; then cat "$out/env.md"; else echo "- (no env.md: no step ran on a GPU here)"; fi
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    [ -f "$out/steps.md" ] && cat "$out/steps.md"
    echo
    [ -f "$out/tests.log" ] && echo "Test summary: $(tail -n 1 "$out/tests.log")" && echo
    for op in scope holov attention; do
      if [ -f "$out/$op.md" ]; then
        echo "## $op"
        echo
        echo "Files: $op.json, $op.md$([ -f "$out/$op.png" ] && echo ", $op.png (latency plot)"); log: bench-$op.log"
        sed 1d "$out/$op.md"
        [ -f "$out/$op.png" ] && printf '\n![%s latency](%s.png)\n' "$op" "$op"
        echo
      elif [ -f "$out/bench-$op.log" ]; then
        echo "## $op: no table (see bench-$op.log)"
        echo
      fi
    done
    # the issue targets, judged on whichever tables this folder holds
    for op in scope holov attention; do
      if [ -f "$out/$op.json" ]; then
        $py -m vtprune.bench.targets "$out" || echo "(the targets could not be evaluated: see above)"
        echo
        break
      fi
    done
    if [ -f "$out/bench-host.log" ]; then
      echo "## host overhead (benchmarks/host_overhead.py --mode gpu)"
      echo
      echo '```'
      cat "$out/bench-host.log"
      echo '```'
      echo
    fi
  } > "$out/summary.md"
  echo "gpu_suite: wrote $out/summary.md"
}

if [ "${expanded[*]}" = summary ]; then write_summary; exit 0; fi

arch=$($py -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null) || {
  echo "gpu_suite: no usable GPU here (torch.cuda.get_device_capability() failed)" >&2; exit 2; }
write_env

# compute-sanitizer from PATH, else next to the CUDA toolkit setup.py may have found nvcc in
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")

pytest_args=(-q)
cpus=$(nproc 2>/dev/null || echo 8)
if $py -c "import xdist" 2>/dev/null; then pytest_args+=(-n "${PYTEST_WORKERS:-$(( cpus < 16 ? cpus : 16 ))}"); fi
# word-split on purpose (quoted words stay whole through eval): PYTEST_ARGS='-k "not emu"'
[ -n "${PYTEST_ARGS:-}" ] && eval "pytest_args+=($PYTEST_ARGS)"
plots=0
$py -c "import matplotlib" 2>/dev/null && plots=1

for s in "${expanded[@]}"; do
  case $s in
    build) step build env VTPRUNE_BUILD_CUDA=1 VTPRUNE_CUDA_ARCHS="$arch" $py -m pip install --no-build-isolation --no-deps -e . -v ;;
    info) step info $py -m vtprune info ;;
    tests) step tests $py -m pytest "${pytest_args[@]}" tests ;;
    sanitizer-*)
      # memcheck also covers the Triton kernels (--triton); the shared-memory race and barrier
      # checks target our CUDA code, and Triton under racecheck takes much longer.
      tool=${s#sanitizer-}
      driver_args=()
      [ "$tool" = memcheck ] && driver_args=(--triton)
      # Without torch's caching allocator every tensor is its own allocation, so an overrun past a
      # small tensor is an error instead of a write into a neighbour inside a cached 2 MiB block.
      step "$s" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
        $py benchmarks/sanitizer_driver.py ${driver_args[@]+"${driver_args[@]}"} ;;
    bench-host) step "$s" $py benchmarks/host_overhead.py --mode gpu ;;
    bench-*)
      op=${s#bench-}
      rm -f "$out/$op.json" "$out/$op.md" "$out/$op.png"  # no stale table from an earlier run
      plot_args=()
      [ $plots -eq 1 ] && plot_args=(--plot "$out/$op.png")
      [ $plots -eq 1 ] || echo "gpu_suite: matplotlib is not installed: the $op table runs, its plot is skipped"
      # the ${a[@]+...} form: an empty array is an unbound variable under `set -u` before bash 4.4
      step "$s" $py benchmarks/run.py --op "$op" --out "$out" ${plot_args[@]+"${plot_args[@]}"} ;;
    summary) ;;
  esac
done
write_summary
exit $status
