# Demo inputs built on first use: photos derived from images shipped in installed packages, and a tiny
# random-weight SD1.5-shaped model. Demo embeddings are meaningless; they prove the pipeline runs.


rule demo_photos:
    output:
        directory(f"{DEMO_PHOTO_ROOT}/{{demo_subject}}"),
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/demo_photos/{demo_subject}.log",
    script:
        "../workflow/scripts/demo_photos.py"


rule demo_model:
    output:
        directory(DEMO_MODEL_DIR),
    params:
        seed=0,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/demo_model/demo_model.log",
    script:
        "../workflow/scripts/demo_model.py"
