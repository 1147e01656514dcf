#!/usr/bin/env bash
# The first-GPU checklist (issues 5 and 13), for one CUDA machine; about 10 minutes on one H100.
#
#   1. equivalence: the tests of tests/test_distributed.py with the heads on the GPU (2 gloo ranks sharing it);
#   2. nccl:        a one-rank NCCL process group training a few steps (bench/nccl_smoke.py): DDP, the sharded
#                   head, the reduce-scatter of the gathered embeddings, a sharded checkpoint;
#   3. throughput:  iresnet50 + unitsface, batch 256, samples/s for fp32 / bf16 / fp16 × channels-last on/off ×
#                   torch.compile off/on (bench/train_throughput.py);
#   4. head_scaling: time and memory of the heads alone at C = 1M and 2M (1 rank; bench/head_scaling.py);
# then every JSON result line goes into one file, $OUT/gpu_check.json.
#
# Usage: bash bench/gpu_check.sh                      (results in $OUT, default ./gpu_check_results; exit 1 if a
#                                                      check failed)
#        GPU_CHECK_MODE=cpu bash bench/gpu_check.sh   (the same checks reduced to a CPU and a minute: what CI runs,
#                                                      so that the script cannot rot)
#        GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  (lists the commands only)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_results}"
MODE="${GPU_CHECK_MODE:-gpu}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"  # a rerun into the same $OUT starts a fresh summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

if [ "$MODE" = cpu ]; then  # tiny sizes: every code path, no meaningful number
    DEVICE=cpu; BACKBONE=tinyfacenet; BATCH=8; CLASSES=1000; DIM=64; STEPS=2; WARMUP=1
    AMPS="none bf16"; COMPILES="off"; SCALING_CLASSES="2000"; SCALING_HEADS="cosface unitsface"
else
    DEVICE=cuda; BACKBONE=iresnet50; BATCH=256; CLASSES=10572; DIM=512; STEPS=30; WARMUP=10
    AMPS="none bf16 fp16"; COMPILES="off on"; SCALING_CLASSES="1000000 2000000"
    SCALING_HEADS="cosface unitsface cosface@0.1"
fi

if [ "$DRY_RUN" != 1 ] && [ "$MODE" != cpu ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
    { nvidia-smi || true; "$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
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

if [ "$MODE" != cpu ]; then  # on a CPU these tests are part of `make test` already
    run equivalence 300 env UNITSFACE_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_distributed.py
fi

run nccl 180 "$PYTHON" bench/nccl_smoke.py --device "$DEVICE" --steps 3

for amp in $AMPS; do
    for layout in channels-last no-channels-last; do
        for compile in $COMPILES; do
            flag=""; [ "$compile" = on ] && flag="--compile"
            run "throughput_${amp}_${layout}_compile-${compile}" 300 "$PYTHON" bench/train_throughput.py \
                --device "$DEVICE" --backbones "$BACKBONE" --heads unitsface --batch "$BATCH" --classes "$CLASSES" \
                --dim "$DIM" --amp "$amp" "--$layout" $flag --steps "$STEPS" --warmup "$WARMUP"
        done
    done
done

# shellcheck disable=SC2086  # the lists split into arguments
run head_scaling 480 "$PYTHON" bench/head_scaling.py --device "$DEVICE" --classes $SCALING_CLASSES \
    --heads $SCALING_HEADS --ranks 1 --steps "$STEPS" --warmup "$WARMUP" --dim "$DIM"

if [ "$DRY_RUN" != 1 ]; then  # every measurement line ends in a JSON object: one file with all of them
    "$PYTHON" - "$OUT" "$MODE" "$status" <<'PY'
import json, pathlib, sys
out, mode, status = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
checks = {}
for path in sorted(out.glob("*.txt")):
    if path.name in ("summary.txt", "device.txt"):
        continue
    lines = [line[line.index("{"):] for line in path.read_text().splitlines() if line.rstrip().endswith("}") and "{" in line]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    checks[path.stem] = records
device = (out / "device.txt").read_text() if (out / "device.txt").is_file() else "cpu"
text = json.dumps({"mode": mode, "device": device, "all_passed": status == 0, "checks": checks}, indent=1)
(out / "gpu_check.json").write_text(text + "\n")
PY
fi

echo "results in $OUT" | tee -a "$OUT/summary.txt"
exit $status
