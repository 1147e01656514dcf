#!/usr/bin/env bash
# GPU checks of the distributed work (issue 5), for one CUDA machine; about 5 minutes on one H100.
#
#   1. the equivalence tests of tests/test_distributed.py with the heads on the GPU (2 gloo ranks
#      sharing it; the trainer and checkpoint parts stay on CPU);
#   2. training throughput, iresnet50 and vit_t + unitsface head, batch 256, bf16 autocast, channels-last
#      (samples/s, forward + backward + SGD step), and the same with cosface (bench/train_throughput.py);
#   3. the head-scaling table at C = 1M and 2M (1 rank; cosface, unitsface, cosface@0.1 dense and sparse).
#
# Usage: bash bench/gpu_check.sh     (results in $OUT, default ./gpu_check_results; exit status 1 if a check failed)
#        GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh    (no GPU needed: lists the commands; tests/test_bench_scripts.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_results}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"  # a rerun into the same $OUT starts a fresh summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

if [ "$DRY_RUN" != 1 ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
    { nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
        > "$OUT/device.txt" 2>&1
fi

run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.txt, failure remembered, the next check still runs
    local name=$1 seconds=$2
    shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    if [ "$DRY_RUN" = 1 ]; then
        echo "   would run (limit $seconds s):$(printf ' %q' "$@")" | tee -a "$OUT/summary.txt"
        return
    fi
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

run equivalence 240 env UNITSFACE_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_distributed.py

run throughput 150 python bench/train_throughput.py  # its defaults are this check's settings

run head_scaling 240 python bench/head_scaling.py --device cuda --classes 1000000 2000000 --ranks 1 --steps 10 --warmup 3

echo "results in $OUT" | tee -a "$OUT/summary.txt"
exit $status
