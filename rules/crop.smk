rule crop:
    """Face crops of one subject's photos: manifest (a row per photo), identity filter summary, contact sheet."""
    input:
        "results/{subject}/raw/manifest.tsv",
        reference=crop_reference_files,
    output:
        **CROP_OUTPUTS,
    log:
        "logs/crop/{subject}.log",
    benchmark:
        "benchmarks/crop/{subject}.tsv"
    conda:
        "../envs/tifactory.yaml"
    threads: 2
    params:
        # the crops' side is the subject's training resolution (train.resolution, "auto" resolved)
        crop=lambda wildcards: {**config["crop"], "resolution": subject_train_params(wildcards)["resolution"]},
        faces=config["faces"],
        face_models=FACE_MODELS.params(),
        max_megapixels=config["collect"]["max_megapixels"],
        reference=crop_reference_photos,
    script:
        "../workflow/scripts/crop.py"


rule crop_summary:
    """Kept and rejected photos by reason, one row per subject (results/summary/crops.tsv)."""
    input:
        expand(CROP_OUTPUTS["manifest"], subject=SUBJECTS),
    output:
        "results/summary/crops.tsv",
    log:
        "logs/crop_summary/crop_summary.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        subjects=SUBJECTS,
    message:
        f"crop_summary (roster): {len(SUBJECTS)} subject(s) -> {{output}} (log: {{log}})"
    script:
        "../workflow/scripts/crop_summary.py"
