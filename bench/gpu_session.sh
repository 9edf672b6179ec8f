#!/usr/bin/env bash
# Issue 5's GPU measurements, one part per call of the GPU machine (the device tool), so the 30 minutes
# of device time go to measuring. Here first: build the venv, run ../shared/gpu/wheelhouse (fills .whl/),
# then call the device tool with carry [".whl"] and the command `bash bench/gpu_session.sh PART`:
#
#   checks    (~5 min) the CUDA paths the CPU tests cannot reach: tests/test_precision.py on the GPU
#             (GradScaler's found_inf with fused optimizers, no host reads between log steps, fused SGD's
#             momentum after a skipped first step, ...), short mprun runs (auto -> bf16, fp16 skip counting,
#             compile + statistics, one-rank DDP), pinned host-side synthetic batches, and bench/loader.py on a
#             generated imagefolder
#   resnet50  bench/gpu_step.py --models resnet50 (eager, then compiled), at most 7 minutes of cells
#   vit       bench/gpu_step.py --models vit_b16, likewise
#
# Results land in $OUT (gpu_step.json/md merge with bench/results/gpu_step.json, so copy each part's
# files into bench/results/ before the next part). Each part prints its table last.
set -euo pipefail
part=${1:?usage: bash bench/gpu_session.sh checks|resnet50|vit}
case "$part" in checks|resnet50|vit) ;; *) echo "usage: bash bench/gpu_session.sh checks|resnet50|vit" >&2; exit 2;; esac
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step() {  # one gpu_step.py slice, merged into the results so far
  [ -f bench/results/gpu_step.json ] && cp bench/results/gpu_step.json "$OUT/"
  python3 bench/gpu_step.py --out "$OUT" --budget-s 420 "$@" 2>&1 | tee -a "$OUT/gpu_step.log"
}

case "$part" in
  checks)
    # Each check goes on after a failure of the one before; the logs say which failed.
    MPRUN_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_precision.py \
      tests/test_input.py::test_host_side_synthetic_batches_are_pinned 2>&1 | tee "$OUT/checks.log" | tail -15 || true
    run=(python3 -m mprun dataset=synthetic dataset.shape=[3,64,64] dataset.num_samples=4096 model=resnet18
         trainer.max_epochs=2 trainer.log_every_steps=10 tracking=none trainer.progress=log)
    { set +e  # every run, whatever the one before did
      "${run[@]}" precision=auto hydra.run.dir=/tmp/r/auto
      "${run[@]}" precision=fp16 precision.init_scale=16777216 hydra.run.dir=/tmp/r/fp16  # early steps overflow: skips counted?
      "${run[@]}" precision=bf16 trainer.compile=true trainer.channels_last=true precision.stats_every_steps=20 hydra.run.dir=/tmp/r/compiled
      python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m mprun trainer.strategy=ddp precision=bf16 \
        dataset=synthetic dataset.shape=[3,64,64] model=resnet18 trainer.max_epochs=1 tracking=none hydra.run.dir=/tmp/r/ddp
    } 2>&1 | tee "$OUT/runs.log" | grep -E "^(precision|val/acc|throughput|input|peak memory|loss scale|time) |error|Error" || true
    # 2,000 generated photos: 1,800 for training, 14 batches of 128, all that --warmup 3 --steps 10 need.
    python3 bench/loader.py --make-imagefolder /tmp/imgs --out "$OUT" --warmup 3 --steps 10 dataset=imagefolder \
      dataset.root=/tmp/imgs model=resnet50 precision=bf16 trainer.channels_last=true dataset.batch_size=128 2>&1 \
      | tee "$OUT/loader.log" | tail -15 || true
    ;;
  resnet50) step --models resnet50 ;;
  vit) step --models vit_b16 ;;
  *) echo "unknown part: $part (checks, resnet50, vit)" >&2; exit 2 ;;
esac
