#!/usr/bin/env bash
# Issue 20 on one GPU (device tool): N subjects in ONE Snakemake run through the GPU worker (first subject
# with an empty torch.compile cache), then the same rules with the worker off (every job loads its own
# models) on the same machine, for the ratio. Run from a copy of the repo that holds results/<s>/dataset
# (bench_workflow.py prepare --subjects 10, on a CPU machine) with the wheels in WHEELS.
#   bash bench/h200_issue20.sh OUT WHEELS STEPS SAVE_EVERY SERIES_BUDGET_S
set -u
OUT=$1; WHEELS=$2; STEPS=${3:-100}; EVERY=${4:-20}; BUDGET=${5:-430}
export PYTHONUNBUFFERED=1
# pulp (16 MB, the ILP job scheduler's solver) is not carried: snakemake goes in without its dependencies,
# the rest resolve against what the machine has; Snakemake then schedules greedily
python3 -m pip install -q --no-index --no-deps "$WHEELS"/snakemake-9*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --find-links "$WHEELS" $(ls "$WHEELS"/*.whl | grep -v /snakemake-9) 2>&1 | tail -3
# The face stages do not run here (--touch), but the Snakefile resolves the face models at parse time from file
# checks (dlib importable, face-recognition-models' two files listed): stand-ins under /tmp/facestub satisfy
# those checks only; nothing here detects or recognises a face.
F=/tmp/facestub; mkdir -p $F/dlib $F/face_recognition_models/models $F/face_recognition_models-0.3.0.dist-info
touch $F/dlib/__init__.py $F/face_recognition_models/models/shape_predictor_5_face_landmarks.dat \
      $F/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat
printf 'Metadata-Version: 2.1\nName: face-recognition-models\nVersion: 0.3.0\n' > $F/face_recognition_models-0.3.0.dist-info/METADATA
printf 'face_recognition_models/models/shape_predictor_5_face_landmarks.dat,,\nface_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat,,\n' \
    > $F/face_recognition_models-0.3.0.dist-info/RECORD
python3 -c "import dlib" 2>/dev/null && F=
export PYTHONPATH=$PWD${F:+:$F}
R=/tmp/issue20-res; rm -rf $R; mkdir -p $R
{ nvidia-smi -L; python3 -c "import torch, transformers, diffusers, snakemake; print(torch.__version__, transformers.__version__, diffusers.__version__, snakemake.__version__)"; } > $R/env.txt 2>&1
cat $R/env.txt
python3 bench/bench_workflow.py series --subjects 10 --steps "$STEPS" --save-every "$EVERY" --cold --tag worker \
    --out $R --budget-s "$BUDGET" 2>&1 | tee $R/series-worker.txt
python3 bench/bench_workflow.py series --first 8 --subjects 1 --steps "$STEPS" --save-every "$EVERY" --worker off \
    --tag inproc --out $R --budget-s 130 2>&1 | tee $R/series-inproc.txt
tar czf "$OUT/res.tgz" -C $R . && ls -la "$OUT"
