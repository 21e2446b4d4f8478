#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H100 / H200: torch and triton already
# installed, no package registry): build against the installed torch for one architecture,
# run the gpu-marked tests, the GPU op bench and the random-weight generation benches.
# Everything lands in $OUT (default ./gpu-out): -v test output, JSON, tables. Each step has
# its own timeout and a failed step does not stop the next.
#
# The device tool allows 10 minutes per command and 15 minutes of device time per session
# (machine start included), so the steps come in two calls whose timeouts add up to less
# than 10 minutes each (typical: build 30 s, tests 60-90 s, ops 1-2 min):
#
#   bash bench/gpu_session.sh                          # deps build tests ops (<= 9 min of timeouts)
#   STEPS="gen-small gen-8b" bash bench/gpu_session.sh   # on the same warm machine, built (<= 8 min)
#   STEPS="tune gen-small" bash bench/gpu_session.sh     # or: the decode tile sweep first (<= 7 min)
#   (on a fresh machine: STEPS="build gen-small", then STEPS="gen-8b")
#   ARCH=80 bash bench/gpu_session.sh                       # an A100
#
# The image has no gguf (a dependency, installed --no-deps here): the tests that write GGUF
# files skip unless a wheel is carried along, e.g. `pip download --no-deps -d gpu-wheels
# gguf==<the constraints.txt pin>` here and `carry: ["gpu-wheels"]`; the deps step installs it.
set -u
OUT=${OUT:-gpu-out}
ARCH=${ARCH:-90}
STEPS=${STEPS:-"deps build tests ops"}
WHEELS=${WHEELS:-gpu-wheels}
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
if [ -d "$WHEELS" ]; then
  step deps 45 "$PY" -m pip install --no-index --no-deps -q --find-links "$WHEELS" gguf
fi
# the build dir outside the tree: the checkout may be read-only or shared with a CPU build
step build 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q \
  -C cmake.define.RINGFUSE_CUDA_ARCHS="$ARCH" -C build-dir=/tmp/rf-gpu-build .
(cd /tmp && "$PY" -m ringfuse info) >"$OUT/info.txt" 2>&1
# compiled kernels (tests/conftest.py sets the interpreter only without a GPU); every
# failure listed, not just the first
step tests 240 "$PY" -m pytest -m gpu -v -p no:cacheprovider --timeout 200 -n "${WORKERS:-12}" tests
step ops 135 "$PY" -m ringfuse bench gpu --json "$OUT/bench_gpu.json"
step tune 240 "$PY" -m ringfuse bench gpu --sections tune --json "$OUT/bench_tune.json"
step gen-small 180 "$PY" -m ringfuse bench generate --device cuda --shape smollm2-135m --json "$OUT/gen_smollm2.json"
step gen-8b 300 "$PY" -m ringfuse bench generate --device cuda --shape llama3-8b --json "$OUT/gen_llama3_8b.json"
echo "done; results in $OUT"
