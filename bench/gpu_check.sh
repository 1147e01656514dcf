#!/usr/bin/env bash
# GPU checks of the distributed work (issue 5), for one CUDA machine; about 5 minutes on one H100.
#
#   1. the equivalence tests of tests/test_distributed.py with the heads on the GPU (2 gloo ranks
#      sharing it; the trainer and checkpoint parts stay on CPU);
#   2. training throughput, iresnet50 + unitsface head, batch 256, bf16 autocast, channels-last
#      (samples/s, forward + backward + SGD step), and the same with cosface;
#   3. the head-scaling table at C = 1M and 2M (1 rank; cosface, unitsface, cosface@0.1 dense and sparse).
#
# Usage: bash bench/gpu_check.sh     (results in $OUT, default ./gpu_check_results; exit status 1 if a check failed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
{ nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
    > "$OUT/device.txt" 2>&1

run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.txt, failure remembered, the next check still runs
    local name=$1 seconds=$2
    shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

run equivalence 240 env UNITSFACE_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_distributed.py

run throughput 150 python - <<'EOF'
import json, sys, time

import torch

sys.path.insert(0, "bench")
from head_scaling import make_ready  # noqa: E402

from unitsface import heads, models, optim  # noqa: E402

torch.backends.cudnn.benchmark = True
device, batch, classes, warmup, steps = torch.device("cuda"), 256, 10_572, 10, 30  # CASIA-WebFace identities
for name in ("unitsface", "cosface"):
    torch.manual_seed(0)
    model = models.build("iresnet50", embedding_size=512).to(device).to(memory_format=torch.channels_last).train()
    head = heads.build(name, classes, 512).to(device).train()
    make_ready(head)  # memory filled, past the warm-up: the full UniTSFace loss
    opt = optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 112, 112, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            embeddings = model(images)
        loss = head(embeddings.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"backbone": "iresnet50", "head": name, "batch": batch, "amp": "bf16", "channels_last": True,
                      "classes": classes, "samples_per_s": round(steps * batch / seconds, 1),
                      "ms_per_step": round(1000 * seconds / steps, 2), "loss": float(loss.detach()),
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
    del model, head, opt
    torch.cuda.empty_cache()
EOF

run head_scaling 240 python bench/head_scaling.py --device cuda --classes 1000000 2000000 --ranks 1 --steps 10 --warmup 3

echo "results in $OUT" | tee -a "$OUT/summary.txt"
exit $status
