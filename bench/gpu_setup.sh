# Sourced by the GPU scripts (bench/h200_issue20.sh, bench/gpu_next.sh) on the device tool's machine, from the
# root of a repo copy: installs the carried wheels in $WHEELS and sets PYTHONPATH.
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
export PYTHONUNBUFFERED=1
