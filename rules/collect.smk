rule collect:
    input:
        collect_inputs,
    output:
        "results/{subject}/raw/manifest.tsv",
    params:
        sources=lambda wildcards: split_sources(ROSTER[wildcards.subject]["sources"]),
        collect=collect_params,
        network_keys=COLLECT_NETWORK_KEYS,
    threads: 2
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/collect/{subject}.log",
    script:
        "../workflow/scripts/collect.py"
