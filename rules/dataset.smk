rule dataset:
    input:
        "results/{subject}/crops",
    output:
        directory("results/{subject}/dataset"),
    params:
        repeats=subject_repeats,
        class_word=subject_class_word,
        resolution=lambda wildcards: subject_train_params(wildcards)["resolution"],
        bucket=lambda wildcards: {
            key: subject_train_params(wildcards)[key]
            for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
        },
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/dataset/{subject}.log",
    script:
        "../workflow/scripts/dataset.py"
