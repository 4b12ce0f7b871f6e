#!/usr/bin/env bash
# One command for a GPU machine: build for the local GPU, run the gpu-marked tests, the doctor and the full
# benchmark grid, and write everything into bench/results/ under the device's name. Sized for one H100/H200
# in about 10 minutes (MGS_GPU_CHECK_MINUTES to change the budget; the bench gets what is left).
#
#   bash bench/gpu_check.sh            # from the repository root, in the environment that has torch (+ triton)
#
# Outputs (SLUG = device name, e.g. nvidia_h100_80gb_hbm3):
#   bench/results/gpu_<SLUG>_build.log, _tests.log (+ _tests.xml), _doctor.log / .json, _weighting.json / .md,
#   _bench.json / .md / .png
# Exit status: 0 when the build, the tests, the doctor and both benches succeeded, else 1 (the summary at
# the end says which step failed).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET_MIN=${MGS_GPU_CHECK_MINUTES:-10}
START=$(date +%s)
OUT=bench/results
mkdir -p "$OUT"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_MIN * 60 - $(elapsed) )); }

DEVICE_INFO=$("$PY" - <<'EOF'
import re, torch
if not torch.cuda.is_available():
    print("none 0")
else:
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    print(re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), f"{major}{minor}")
EOF
) || { echo "gpu_check: '$PY' cannot import torch (activate the environment, or set PYTHON=...)" >&2; exit 1; }
read -r SLUG ARCH <<< "$DEVICE_INFO"
if [ "$SLUG" = "none" ]; then
  echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False)" >&2
  exit 1
fi
PREFIX="$OUT/gpu_${SLUG}"
echo "gpu_check: device $SLUG (sm_$ARCH), budget ${BUDGET_MIN} min, results in ${PREFIX}_*"
declare -A STATUS

# 1. Build both native modules for this GPU only (fast: one architecture, plus its PTX).
echo "[$(elapsed)s] build (MGS_CUDA_ARCHS=$ARCH)"
MGS_CUDA_ARCHS="$ARCH" MGS_BUILD_CPU=1 MGS_BUILD_CUDA=1 MGS_NVCC_THREADS=4 MGS_BUILD_JOBS=2 \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "${PREFIX}_build.log" 2>&1
STATUS[build]=$?
[ "${STATUS[build]}" = 0 ] || tail -n 30 "${PREFIX}_build.log"

# 2. The gpu-marked tests (every GPU backend), CUDA module required.
echo "[$(elapsed)s] gpu tests"
MGS_REQUIRE_NATIVE=cpu,cuda timeout $(( $(left) * 45 / 100 ))s "$PY" -m pytest tests -m gpu -q -p no:cacheprovider \
  -rfEs --junitxml="${PREFIX}_tests.xml" > "${PREFIX}_tests.log" 2>&1
STATUS[tests]=$?
tail -n 15 "${PREFIX}_tests.log"

# 3. The doctor: versions, devices, backend status, parity vs float64, timing.
echo "[$(elapsed)s] doctor"
timeout $(( $(left) * 30 / 100 ))s "$PY" -m mgs_kernels.doctor --json "${PREFIX}_doctor.json" > "${PREFIX}_doctor.log" 2>&1
STATUS[doctor]=$?
sed -n '/^backends/,$p' "${PREFIX}_doctor.log" | head -n 60

# 4. The weighting methods' cost on the GPU (the batched torch code: its kernel launches, no host sync) next
#    to the Gram pass, every method at T = 3 and 8 (torchjd's columns left out: they time CPU solvers).
echo "[$(elapsed)s] bench/weighting.py on the GPU"
timeout $(( $(left) * 15 / 100 ))s "$PY" bench/weighting.py --device cuda --no-torchjd --reps 10 \
  --json "${PREFIX}_weighting.json" --md "${PREFIX}_weighting.md" > "${PREFIX}_weighting.log" 2>&1
STATUS[weighting]=$?
tail -n 40 "${PREFIX}_weighting.log"

# 5. The full benchmark grid with what is left of the budget (the Python-loop baselines stop at 60% of it).
REMAIN=$(left)
if [ "$REMAIN" -lt 60 ]; then REMAIN=60; fi
echo "[$(elapsed)s] bench/run.py (full grid, ${REMAIN}s left)"
timeout "${REMAIN}s" "$PY" bench/run.py --deadline $(( REMAIN * 60 / 100 )) \
  --json "${PREFIX}_bench.json" --md "${PREFIX}_bench.md" --plot "${PREFIX}_bench.png" -v > "${PREFIX}_bench.log" 2>&1
STATUS[bench]=$?
tail -n 40 "${PREFIX}_bench.log"

echo
echo "gpu_check summary ($(elapsed)s, device $SLUG):"
FAIL=0
for step in build tests doctor weighting bench; do
  s=${STATUS[$step]}
  case "$s" in
    0) msg="ok" ;;
    124) msg="TIMED OUT"; FAIL=1 ;;
    *) msg="FAILED (exit $s)"; FAIL=1 ;;
  esac
  echo "  $step: $msg"
done
echo "  results: $(ls "${PREFIX}"_* 2>/dev/null | tr '\n' ' ')"
exit $FAIL
