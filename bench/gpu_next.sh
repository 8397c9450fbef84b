#!/usr/bin/env bash
# The GPU measurements issues 19 and 20 still lack, in stages that fit the device tool's 600 s per call.
# Everything lands under /tmp/gpu-next, packed into $OUT/res.tgz. Run from a repo copy whose results/ holds the
# prepared datasets (on a CPU machine: bench_workflow.py prepare --subjects 10; prepare --family sdxl
# --subjects 2), with the wheels (snakemake, pandas, diffusers and their dependencies) in WHEELS:
#   bash bench/gpu_next.sh OUT WHEELS STAGE...
# The copy (ignored by git, carried with the wheels; the datasets' tomls name their images by absolute path, so
# they are prepared inside the copy, at the path the device tool gives it too):
#   mkdir -p .dev/worker && git archive HEAD | tar -x -C .dev/worker && rm -rf .dev/worker/bench/raw .dev/worker/tests
#   (cd .dev/worker && python bench/bench_workflow.py prepare --subjects 10 \
#      && python bench/bench_workflow.py prepare --family sdxl --subjects 2)
#   device tool: carry [".dev/worker", ".whl"], command: cd .dev/worker && bash bench/gpu_next.sh $OUT ../../.whl STAGE...
# Stages (their seconds as estimated from the H100 runs of 2026-12-05; bench/RESULTS.md):
#   sdxl-rules  issue 19: 2 SDXL subjects through the rules in one Snakemake run, through the GPU worker, from a
#               random original-layout SDXL file (~6.9 GB), empty compile cache; 50 steps, a checkpoint every
#               10 (the recipe's grid: 5 checkpoints + step 0 x 4 prompts, 24 images at 1024)     ~330 s
#   sdxl-steps  issue 19: steady ms/step eager at the default micro-batch (15) and the 24 GB setting
#               (micro-batch 2 + gradient checkpointing), peak and floor memory                    ~110 s
#   roster      issue 20: 10 SD1.5 subjects in one run through the worker (cold cache), 100 steps, then
#               one subject with the worker off for the ratio                                       ~530 s
set -u
OUT=$1; WHEELS=$2; shift 2
source bench/gpu_setup.sh
R=/tmp/gpu-next; mkdir -p $R
{ nvidia-smi -L; python3 -c "import torch, transformers, diffusers, snakemake; print(torch.__version__, transformers.__version__, diffusers.__version__, snakemake.__version__)"; } > $R/env.txt 2>&1
cat $R/env.txt
for stage in "$@"; do
  echo "==== $stage at $(date +%T)"
  case $stage in
    sdxl-rules) python3 bench/bench_workflow.py series --family sdxl --subjects 2 --steps 50 --save-every 10 --cold \
                  --tag sdxl --out $R --budget-s 420 2>&1 | tee $R/series-sdxl.txt ;;
    sdxl-steps) python3 bench/bench_train.py --family sdxl --resolution 1024 --device cuda --steps 12 --save-every 4 \
                  --images 4 --variants eager15,eager2-gc --budget-s 150 --json-out $R/sdxl-steps.jsonl 2>&1 \
                  | tee $R/sdxl-steps.txt ;;
    roster) python3 bench/bench_workflow.py series --subjects 10 --steps 100 --save-every 20 --cold --tag worker \
              --out $R --budget-s 420 2>&1 | tee $R/series-worker.txt
            python3 bench/bench_workflow.py series --first 8 --subjects 1 --steps 100 --save-every 20 --worker off \
              --tag inproc --out $R --budget-s 130 2>&1 | tee $R/series-inproc.txt ;;
    *) echo "unknown stage $stage" ;;
  esac
done
tar czf "$OUT/res.tgz" -C $R . && ls -la "$OUT"
