#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H100 / H200: torch and triton already
# installed, no package registry): build against the installed torch for one architecture,
# run the gpu-marked tests, the GPU op bench and the random-weight generation benches.
# Everything lands in $OUT (default ./gpu-out): -v test output, JSON, tables. Each step has
# its own timeout and a failed step does not stop the next. ~6-10 minutes in all.
#
#   bash bench/gpu_session.sh              # all steps
#   STEPS="tests ops" bash bench/gpu_session.sh
#   ARCH=80 bash bench/gpu_session.sh      # an A100
set -u
OUT=${OUT:-gpu-out}
ARCH=${ARCH:-90}
STEPS=${STEPS:-"build tests ops gen-small gen-8b"}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
step() {  # name timeout_s command...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name ($(date +%T))" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}
# the build dir outside the tree: the checkout may be read-only or shared with a CPU build
step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q \
  -C cmake.define.RINGFUSE_CUDA_ARCHS="$ARCH" -C build-dir=/tmp/rf-gpu-build .
(cd /tmp && "$PY" -m ringfuse info) >"$OUT/info.txt" 2>&1
# compiled kernels (tests/conftest.py sets the interpreter only without a GPU); every
# failure listed, not just the first
step tests 420 "$PY" -m pytest -m gpu -v -p no:cacheprovider --timeout 300 -n "${WORKERS:-8}" tests
step ops 300 "$PY" -m ringfuse bench gpu --json "$OUT/bench_gpu.json"
step gen-small 300 "$PY" -m ringfuse bench generate --device cuda --shape smollm2-135m --json "$OUT/gen_smollm2.json"
step gen-8b 600 "$PY" -m ringfuse bench generate --device cuda --shape llama3-8b --json "$OUT/gen_llama3_8b.json"
echo "done; results in $OUT"
