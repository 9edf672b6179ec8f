#!/usr/bin/env bash
# The GPU measurements in ONE call of the GPU machine (the device tool), at most BUDGET_S seconds (default 480) of
# work, most important first. Here first: build the venv and run ../shared/gpu/wheelhouse (fills .whl/); then call
# the device tool with carry [".whl"] and the command `bash bench/gpu_session.sh`. `--dry-run` prints the plan (here,
# on the CPU, too) and runs nothing.
#
#   1. the GPU-only tests: tests/test_precision.py and tests/test_lowbit.py on the GPU (found_inf with fused
#      optimizers, no host reads between log steps, fp8's sm_89 check against a real device, ...), cut at 90 s
#   2. resnet50: fp32 eager, bf16 compiled channels_last, fp16 compiled channels_last, against the hand loop
#   3. vit_b16: bf16 vs fp8, both compiled
#   4. gpt2_small: bf16 vs fp8, both compiled (tokens/s, MFU)
#   5. peak memory of bf16 vs bf16_pure (resnet50 and vit_b16, eager)
#
# bench/gpu_step.py's --budget-s guard starts no cell that would end past the budget; the cells it leaves out are
# printed, and the same command in the next call measures only those (the result file keeps measured cells: copy
# $OUT/gpu_step.json into bench/results/ between calls). Everything lands in $OUT; the table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-480}
TESTS_S=90
CELLS=resnet50:fp32:eager,resnet50:bf16:compiled,resnet50:fp16:compiled
CELLS+=,vit_b16:bf16:compiled,vit_b16:fp8:compiled
CELLS+=,gpt2_small:bf16:compiled,gpt2_small:fp8:compiled
CELLS+=,resnet50:bf16:eager,resnet50:bf16_pure:eager,vit_b16:bf16:eager,vit_b16:bf16_pure:eager
OUT=${OUT:-/tmp/gpu_session_out}
py=${PYTHON:-python3}  # the dry run's interpreter (the tests pass theirs)

if [ "${1:-}" = "--dry-run" ]; then
  echo "plan, budget ${BUDGET_S} s:"
  echo "1. GPU-only tests: tests/test_precision.py tests/test_lowbit.py, cut at ${TESTS_S} s"
  echo "2-5. bench/gpu_step.py cells, in this order, with --budget-s $((BUDGET_S - TESTS_S)):"
  $py bench/gpu_step.py --cells "$CELLS" --budget-s $((BUDGET_S - TESTS_S)) --out "$OUT" --dry-run
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2; }

start=$SECONDS
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

# 1. A failure here is logged and the measurements go on; the log says which test failed.
MPRUN_TEST_DEVICE=cuda timeout "$TESTS_S" python3 -m pytest -q -n0 -p no:cacheprovider tests/test_precision.py \
  tests/test_lowbit.py tests/test_input.py::test_host_side_synthetic_batches_are_pinned > "$OUT/checks.log" 2>&1 || true
tail -5 "$OUT/checks.log"

# 2-5. What is left of the budget goes to the cells, in CELLS' order.
[ -f bench/results/gpu_step.json ] && cp bench/results/gpu_step.json "$OUT/"
left=$((BUDGET_S - (SECONDS - start)))
python3 bench/gpu_step.py --cells "$CELLS" --budget-s "$left" --out "$OUT" 2>&1 | tee "$OUT/gpu_step.log" | tail -40
echo "gpu_session: $((SECONDS - start)) s of a ${BUDGET_S} s budget"
