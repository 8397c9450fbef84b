# Demo inputs built on first use: photos derived from images shipped in installed packages, and a tiny
# random-weight SD1.5-shaped model. Demo embeddings are meaningless; they prove the pipeline runs.


rule demo_photos:
    """Demo raw photos of one demo subject, derived from images shipped in installed packages."""
    output:
        directory(f"{DEMO_PHOTO_ROOT}/{{demo_subject}}"),
    log:
        "logs/demo_photos/{demo_subject}.log",
    conda:
        "../envs/tifactory.yaml"
    script:
        "../workflow/scripts/demo_photos.py"


rule demo_model:
    """The demo's tiny random-weight SD1.5-shaped model (no download)."""
    output:
        directory(DEMO_MODEL_DIR),
    log:
        "logs/demo_model/demo_model.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        seed=0,
    script:
        "../workflow/scripts/demo_model.py"
