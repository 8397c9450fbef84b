rule crop:
    input:
        "results/{subject}/raw/manifest.tsv",
        reference=crop_reference_files,
    output:
        directory("results/{subject}/crops"),
    params:
        crop=config["crop"],
        faces=config["faces"],
        face_models=FACE_MODELS.params(),
        max_megapixels=config["collect"]["max_megapixels"],
        reference=crop_reference_photos,
    threads: 2
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/crop/{subject}.log",
    benchmark:
        "benchmarks/crop/{subject}.tsv"
    script:
        "../workflow/scripts/crop.py"


rule crop_summary:
    input:
        expand("results/{subject}/crops", subject=SUBJECTS),
    output:
        "results/summary/crops.tsv",
    params:
        subjects=SUBJECTS,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/crop_summary/crop_summary.log",
    script:
        "../workflow/scripts/crop_summary.py"
