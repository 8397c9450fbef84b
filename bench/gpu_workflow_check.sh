#!/usr/bin/env bash
# Run the workflow's real train rule on the GPU machine(s) of the device tool, one job per GPU, and record
# which GPU each job used (from the job logs and nvidia-smi while they run). Issue 8's check.
#   bash bench/gpu_workflow_check.sh OUTDIR GPU_TOKENS
# Expects: wheels for snakemake/pandas/diffusers in .whl/ (the machine has torch, transformers), and the
# demo roster's datasets already built (results/*/dataset, resources/demo_photos) by a CPU run:
#   snakemake --cores 2 results/astronaut/dataset results/t1person/dataset
set -euo pipefail
out=${1:?out dir}; tokens=${2:-1}
python3 -m pip install -q --no-index --find-links .whl snakemake==9.27.1 pandas==3.1.1 diffusers==0.42.1 \
    || python3 -m pip install -q --no-index --no-deps --target /tmp/tifactory-site .whl/*.whl
export PYTHONPATH=/tmp/tifactory-site:$PWD
snakemake() { python3 -m snakemake "$@"; }
nvidia-smi -L | tee "$out/gpus.txt"
subjects="astronaut t1person"
targets=$(for s in $subjects; do echo "results/$s/$s-ti.safetensors"; done)
datasets=$(for s in $subjects; do echo "results/$s/dataset"; done)
# the CPU stages were run elsewhere: mark them up to date here, run only the model build and training
snakemake --cores 1 --touch --allowed-rules demo_photos collect crop dataset -- $datasets > "$out/touch.log" 2>&1
snakemake --cores 1 --allowed-rules demo_model -- resources/models/demo-tiny > "$out/model.log" 2>&1
nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory --format=csv -lms 200 > "$out/nvidia-smi.csv" &
smi=$!
printf 'demo_overrides:\n  train:\n    max_train_steps: 50\n    save_every_n_steps: 25\n' > "$out/gpu-config.yaml"
start=$(date +%s.%N)
snakemake --cores 8 --resources gpu="$tokens" --allowed-rules train --configfile "$out/gpu-config.yaml" -- $targets > "$out/snakemake.log" 2>&1 || status=$?
end=$(date +%s.%N)
kill $smi || true
echo "wall_s $(python3 -c "print(round($end - $start, 1))") tokens $tokens status ${status:-0}" | tee "$out/summary.txt"
for s in $subjects; do
    grep -E "CUDA_VISIBLE_DEVICES|CUDA device|all GPUs busy|trained|steps x|done" "logs/train/$s.log" | sed "s/^/$s: /" | tee -a "$out/summary.txt" || true
    cp "logs/train/$s.log" "$out/train-$s.log"
done
