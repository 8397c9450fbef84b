rule dataset:
    """The kohya layout: the kept crops in `<repeats>_<subject> <class>/` and dataset.toml naming it."""
    input:
        CROP_OUTPUTS["manifest"],
    output:
        # the image folder beside it is named by repeats and class word (data): the job empties
        # results/S/dataset/ first, so a folder of earlier settings does not stay
        "results/{subject}/dataset/dataset.toml",
    log:
        "logs/dataset/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        repeats=subject_repeats,
        class_word=subject_class_word,
        resolution=lambda wildcards: subject_train_params(wildcards)["resolution"],
        bucket=lambda wildcards: {
            key: subject_train_params(wildcards)[key]
            for key in (
                "enable_bucket",
                "min_bucket_reso",
                "max_bucket_reso",
                "bucket_reso_steps",
                "bucket_no_upscale",
            )
        },
    script:
        "../workflow/scripts/dataset.py"
