rule collect:
    input:
        collect_inputs,
    output:
        "results/{subject}/raw/manifest.tsv",
    params:
        sources=lambda wildcards: split_sources(ROSTER[wildcards.subject]["sources"]),
        collect=config["collect"],
    threads: 2
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/collect/{subject}.log",
    script:
        "../workflow/scripts/collect.py"
