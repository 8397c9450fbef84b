rule collect:
    input:
        collect_inputs,
    output:
        "results/{subject}/raw/manifest.tsv",
    params:
        sources=lambda wildcards: split_sources(ROSTER[wildcards.subject]["sources"]),
        min_side_px=config["collect"]["min_side_px"],
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/collect/{subject}.log",
    script:
        "../workflow/scripts/collect.py"
