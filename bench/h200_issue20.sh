#!/usr/bin/env bash
# Issue 20 on one GPU (device tool): N subjects in ONE Snakemake run through the GPU worker (first subject
# with an empty torch.compile cache), then the same rules with the worker off (every job loads its own
# models) on the same machine, for the ratio. Run from a copy of the repo that holds results/<s>/dataset
# (bench_workflow.py prepare --subjects 10, on a CPU machine) with the wheels in WHEELS.
#   bash bench/h200_issue20.sh OUT WHEELS STEPS SAVE_EVERY SERIES_BUDGET_S
set -u
OUT=$1; WHEELS=$2; STEPS=${3:-100}; EVERY=${4:-20}; BUDGET=${5:-430}
source bench/gpu_setup.sh
R=/tmp/issue20-res; rm -rf $R; mkdir -p $R
{ nvidia-smi -L; python3 -c "import torch, transformers, diffusers, snakemake; print(torch.__version__, transformers.__version__, diffusers.__version__, snakemake.__version__)"; } > $R/env.txt 2>&1
cat $R/env.txt
python3 bench/bench_workflow.py series --subjects 10 --steps "$STEPS" --save-every "$EVERY" --cold --tag worker \
    --out $R --budget-s "$BUDGET" 2>&1 | tee $R/series-worker.txt
python3 bench/bench_workflow.py series --first 8 --subjects 1 --steps "$STEPS" --save-every "$EVERY" --worker off \
    --tag inproc --out $R --budget-s 130 2>&1 | tee $R/series-inproc.txt
tar czf "$OUT/res.tgz" -C $R . && ls -la "$OUT"
