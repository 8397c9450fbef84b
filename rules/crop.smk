rule crop:
    input:
        "results/{subject}/raw/manifest.tsv",
    output:
        directory("results/{subject}/crops"),
    params:
        crop=config["crop"],
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/crop/{subject}.log",
    benchmark:
        "benchmarks/crop/{subject}.tsv"
    script:
        "../workflow/scripts/crop.py"
