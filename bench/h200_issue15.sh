#!/usr/bin/env bash
# Issue 15 on one H200 (device tool): load split, SDPA backends, FLOPs, and a kernel profile of the compiled
# step, then step variants; everything under $RES, packed into $OUT/res.tgz (the tool returns <= 8 files).
#   bash bench/h200_issue15.sh OUT STAGE...   stages: env load sdpa flops profile blocks  VARIANTS=... train
# Run from the repo root with .whl/ carried (diffusers). Each stage is bounded by `timeout` so the pack runs.
set -u
OUT=$1; shift
RES=/tmp/issue15-res; mkdir -p $RES/prof
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/diffusers-*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site
CACHE=/tmp/issue15-compile-cache
started=$(date +%s)
stage() {  # name seconds command...
  local name=$1 limit=$2; shift 2
  echo "==== $name (limit $limit s, at $(( $(date +%s) - started )) s)"
  timeout -s INT "$limit" "$@" > >(tee -a "$RES/$name.txt") 2>"$RES/$name.log"
  echo "==== $name exit $? at $(( $(date +%s) - started )) s"
}
for what in "$@"; do
  case $what in
    env) { nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.backends.cudnn.version())"; } > $RES/env.txt 2>&1 ;;
    load) stage load 150 python3 bench/bench_load.py --model-dir /tmp/sd15-random --write --runs 2 --json-out $RES/load.json ;;
    sdpa) stage sdpa 90 python3 bench/bench_sdpa.py --json-out $RES/sdpa.json ;;
    flops) stage flops 90 python3 bench/bench_train.py --device cuda --steps 2 --variants eager15-flops --profile-out $RES/prof --json-out $RES/flops.jsonl ;;
    train) stage "train-${TAG:-x}" "${LIMIT:-400}" python3 bench/bench_train.py --device cuda --steps 40 --budget-s "${BUDGET:-300}" \
             --cache-root $CACHE --profile-out $RES/prof --variants "$VARIANTS" --json-out $RES/train.jsonl ;;
  esac
done
tar czf "$OUT/res.tgz" -C "$RES" . && ls -la "$OUT"
