#!/usr/bin/env bash
# Run the workflow's real train rule on the device tool's GPU machine, one job per GPU, and record which
# GPU each job used (job logs, nvidia-smi while they run) and the wall time of one subject alone against
# two subjects at once. Issue 8's check.
#   bash bench/gpu_workflow_check.sh OUTDIR GPU_TOKENS [STEPS]
# Expects: wheels for snakemake/pandas/diffusers in .whl/ (the machine has torch, transformers), and the
# demo roster's datasets already built (results/*/dataset, resources/demo_photos) by a CPU run:
#   snakemake --cores 2 results/astronaut/dataset/dataset.toml results/t1person/dataset/dataset.toml
set -euo pipefail
out=${1:?out dir}; tokens=${2:-1}; steps=${3:-50}
python3 -m pip install -q --no-index --find-links .whl snakemake==9.27.1 pandas==3.1.1 diffusers==0.42.1 \
    || python3 -m pip install -q --no-index --no-deps --target /tmp/tifactory-site .whl/*.whl
export PYTHONPATH=/tmp/tifactory-site:$PWD
snakemake() { python3 -m snakemake "$@"; }
nvidia-smi -L | tee "$out/gpus.txt"
subjects="astronaut t1person"
datasets=$(for s in $subjects; do echo "results/$s/dataset/dataset.toml"; done)
# the CPU stages were run elsewhere: mark them up to date here, run only the model build and training
snakemake --cores 1 --touch --allowed-rules demo_photos collect crop dataset -- $datasets > "$out/touch.log" 2>&1
snakemake --cores 1 --allowed-rules demo_model -- resources/models/demo-tiny > "$out/model.log" 2>&1
# eager (no compile) so that no job waits on another's compile cache
printf 'train:\n  compile: false\ndemo_overrides:\n  train:\n    max_train_steps: %s\n    save_every_n_steps: %s\n' \
    "$steps" "$steps" > "$out/gpu-config.yaml"

train() {  # train TAG SUBJECT...: the train rule for these subjects, with nvidia-smi sampling alongside
    local tag=$1; shift
    local targets=$(for s in "$@"; do echo "results/$s/$s-ti.safetensors"; done)
    for s in "$@"; do rm -rf "results/$s/$s-ti.safetensors" "results/$s/checkpoints" "results/$s/train" "results/$s/train_state"; done
    nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory --format=csv -lms 200 > "$out/nvidia-smi-$tag.csv" &
    local smi=$! status=0 start end
    start=$(date +%s.%N)
    snakemake --cores 8 --resources gpu="$tokens" --allowed-rules train --configfile "$out/gpu-config.yaml" \
        -- $targets > "$out/snakemake-$tag.log" 2>&1 || status=$?
    end=$(date +%s.%N)
    kill $smi || true
    echo "$tag: wall_s $(python3 -c "print(round($end - $start, 1))") tokens $tokens subjects $* status $status" | tee -a "$out/summary.txt"
    for s in "$@"; do
        grep -E "CUDA_VISIBLE_DEVICES|CUDA device|all GPUs busy|training [0-9]|done" "logs/train/$s.log" \
            | grep -v "modules in" | sed "s/^/$tag $s: /" | tee -a "$out/summary.txt" || true
        cp "logs/train/$s.log" "$out/train-$tag-$s.log"
    done
    python3 - "$out/nvidia-smi-$tag.csv" <<'PY' | tee -a "$out/summary.txt"
import collections, sys
rows = [line.split(", ") for line in open(sys.argv[1]).read().splitlines()[1:] if line.count(",") >= 3]
per_sample = collections.defaultdict(set)
for timestamp, gpu, pid, _ in rows:
    per_sample[timestamp].add((gpu, pid))
pairs = {frozenset(s) for s in per_sample.values()}
both = [s for s in per_sample.values() if len({gpu for gpu, _ in s}) >= 2]
print(f"nvidia-smi: {len(per_sample)} samples with a process; {len(both)} with processes on 2 GPUs at once; "
      f"GPU per pid: {sorted({(pid, gpu[-8:]) for s in per_sample.values() for gpu, pid in s})}")
PY
}

train solo astronaut
train pair $subjects
